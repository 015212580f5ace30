"""What a test run must not leave behind: read from the kernel, not from Wisp.

Host objects outside the test's base dir (network namespaces, /run/wisp) are matched by
the tag of the servers that ran below it, so another test run on the same host (or a
server of a developer) never counts as a leak of this one."""

from __future__ import annotations

import hashlib
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


def _server_tags(base: str) -> set[str]:
    """The host-object tag (`ContainerRuntime.tag`) of every server whose data dir is below
    `base`: what their network namespaces and /run/wisp dirs are named by."""
    candidates = [Path(base)]
    for d in (Path(base), *Path(base).iterdir()) if Path(base).is_dir() else ():
        if d.is_dir() and not os.path.ismount(d):
            candidates += [c for c in d.iterdir() if c.is_dir() and not os.path.ismount(c)]
    # every candidate, run dir or not: a server whose start failed early may never have
    # made one, yet have mounted something under /run/wisp/<its tag>
    return {hashlib.sha1(str((c / "run" / "sprites").resolve()).encode()).hexdigest()[:10]
            for c in candidates}


def _netns(tags: set[str]) -> list[str]:
    d = Path("/run/netns")
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir()
                  if p.name.startswith("wisp-") and p.name.split("-")[1] in tags)


def _boot_dirs(tags: set[str]) -> list[str]:
    """/run/wisp/<tag> dirs (each sprite's boot tmpfs lives below one) and mounts there."""
    found = []
    for tag in tags:
        root = Path("/run/wisp") / tag
        found += _mounts_under(str(root))
        if root.exists():
            found.append(str(root))
    return found


def _veths(tags: set[str]) -> list[str]:
    """Host-side sprite veths (`w<tag6><slot>`, wisp/network/links.py)."""
    prefixes = tuple(f"w{t[:6]}" for t in tags)
    return sorted(d.name for d in Path("/sys/class/net").iterdir()
                  if prefixes and d.name.startswith(prefixes) and len(d.name) == 11)


def _nft_tables(tags: set[str]) -> list[str]:
    res = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    names = {f"wisp_{t}" for t in tags}
    return sorted(line for line in res.stdout.splitlines()
                  if line.split()[-1:] and line.split()[-1] in names)


def leaks(base: Path) -> dict[str, list[str]]:
    """Every mount, loop device, runc container and process tied to `base`, plus any wisp
    network namespace on the host. Empty lists everywhere means a clean host."""
    b = os.path.realpath(base)
    tags = _server_tags(b)
    return {
        "mounts": _mounts_under(b),
        "loop devices": _loops_under(b),
        "runc containers": _runc_containers(b),
        "processes": _processes_mentioning(b),
        "network namespaces": _netns(tags),
        "boot dirs": _boot_dirs(tags),
        "veths": _veths(tags),
        "nftables tables": _nft_tables(tags),
    }
