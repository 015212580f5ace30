"""The microvm guest's boot assets (wisp/runtime/vm/assets.py) boot for real.

The kernel, its modules and the python image are built into the repository's build/vm (as
`make vm` does; reused between runs, so only the first run pays for them). A guest booted
under TCG (KVM does not run guests on every host; `tcg_kernel_args()` keeps its kernel
from hanging on TSC calibration) loads the modules in `order`, mounts the
python image read-only from a virtio disk at /tools and runs the interpreter with exactly
GUEST_PYTHON_ENV: the stdlib modules a guest agent needs must import there.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wisp.runtime.vm.assets import (
    GUEST_PYTHON,
    GUEST_PYTHON_ENV,
    GUEST_TOOLS,
    QEMU,
    build_dir,
    build_initrd,
    ensure_kernel,
    ensure_python,
    probe_kvm,
    tcg_kernel_args,
)

BOOT_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def assets() -> tuple[Path, Path, Path]:
    vmlinux, modules = ensure_kernel(build_dir())
    return vmlinux, modules, ensure_python(build_dir())


@pytest.fixture
def scratch(leak_check: Path) -> Iterator[Path]:
    """Below the session's base dir: a QEMU left running would show in the leak check."""
    d = leak_check / f"vm-assets-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    yield d


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


def boot(cmd: list[str], until: str, timeout: float) -> str:
    """QEMU's console output up to `until` (or its exit, or the timeout); QEMU's whole
    process group is killed before this returns."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while until.encode() not in out and (left := deadline - time.monotonic()) > 0:
            if not select.select([proc.stdout], [], [], left)[0]:
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()
    return out.decode(errors="replace")


def guest_init(command: str) -> bytes:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in GUEST_PYTHON_ENV.items())
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/lib/modules/$m" || echo "insmod $m failed"; done < /lib/modules/order
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p {GUEST_TOOLS}
mount -t ext4 -o ro /dev/vda {GUEST_TOOLS} || echo "mount failed"
env -i {env} {command}
echo "exit status $?"
poweroff -f
""".encode()


def test_python_runs_in_the_guest(assets: tuple[Path, Path, Path], scratch: Path) -> None:
    """Modules load in `order`, the image mounts read-only, and the interpreter imports
    asyncio, ctypes, json, socket, zlib and pyexpat with GUEST_PYTHON_ENV alone."""
    vmlinux, modules, python = assets
    code = 'import asyncio, ctypes, json, socket, zlib, pyexpat; print("PY-OK", 6*7)'
    initrd = build_initrd(scratch, {"init": guest_init(f"{GUEST_PYTHON} -c '{code}'")},
                          modules)
    cmd = [QEMU, "-M", "microvm,rtc=on", "-accel", "tcg", "-cpu", "max", "-m", "256",
           "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
           "-kernel", str(vmlinux), "-initrd", str(initrd),
           "-drive", f"file={python},if=none,id=py,format=raw,readonly=on",
           "-device", "virtio-blk-device,drive=py",
           "-append", f"console=ttyS0 quiet panic=-1 {tcg_kernel_args()}", "-no-reboot"]
    started = time.monotonic()
    out = boot(cmd, "exit status", BOOT_TIMEOUT)
    assert "PY-OK 42" in out, f"no PY-OK after {time.monotonic() - started:.1f}s:\n{out}"
    assert "failed" not in out, out
    assert not processes_mentioning(str(scratch))


def test_initrd_is_rebuilt_only_when_inputs_change(assets: tuple[Path, Path, Path],
                                                   scratch: Path) -> None:
    """Same inputs: the same file is kept; another content: it is rewritten."""
    _, modules, _ = assets
    first = build_initrd(scratch, {"init": b"#!/bin/busybox sh\n"}, modules)
    mtime = first.stat().st_mtime_ns
    assert build_initrd(scratch, {"init": b"#!/bin/busybox sh\n"}, modules).stat(
        ).st_mtime_ns == mtime
    build_initrd(scratch, {"init": b"#!/bin/busybox sh\necho\n"}, modules)
    assert first.stat().st_mtime_ns != mtime
    assert not [p.name for p in scratch.iterdir() if p.name.endswith(".tmp")]


def test_probe_kvm_answers_and_cleans_up(assets: tuple[Path, Path, Path],
                                         scratch: Path) -> None:
    """A bool (False on hosts where KVM cannot run a guest), no QEMU and no file left."""
    vmlinux, _, _ = assets
    before = set(scratch.iterdir())  # the probe's QEMU names its initramfs below scratch
    answer = probe_kvm(vmlinux, scratch, timeout=20.0)
    assert isinstance(answer, bool)
    assert set(scratch.iterdir()) == before
    assert not processes_mentioning(str(scratch))
