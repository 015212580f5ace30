"""What a test run must not leave behind: read from the kernel, not from Wisp."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _mounts_under(base: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(base):
                found.append(point)
    return found


def _loops_under(base: str) -> list[str]:
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            target = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if target.startswith(base):
            found.append(f"/dev/{entry.name} -> {target}")
    return found


def _runc_containers(base: str) -> list[str]:
    found = []
    for root in Path(base).rglob("runc"):
        if root.is_dir():
            res = subprocess.run(["runc", "--root", str(root), "list", "-q"],
                                 capture_output=True, text=True, timeout=30)
            found += [f"{root}: {c}" for c in res.stdout.split()]
    return found


def _processes_mentioning(base: str) -> list[str]:
    found = []
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if base in cmd:
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


def _netns() -> list[str]:
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir() if p.name.startswith("wisp-")) if d.exists() else []


def leaks(base: Path) -> dict[str, list[str]]:
    """Every mount, loop device, runc container and process tied to `base`, plus any wisp
    network namespace on the host. Empty lists everywhere means a clean host."""
    b = os.path.realpath(base)
    return {
        "mounts": _mounts_under(b),
        "loop devices": _loops_under(b),
        "runc containers": _runc_containers(b),
        "processes": _processes_mentioning(b),
        "network namespaces": _netns(),
    }
