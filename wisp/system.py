"""Running host commands and reading real system state.

Every component that touches the host (mounts, loop devices, processes) asks the kernel what
is true (`/proc/self/mountinfo`, `losetup`, `kill(pid, 0)`) instead of trusting its own flags,
so that a start after a crash sees exactly what the crash left behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
from pathlib import Path

from wisp.errors import SystemError_

__all__ = ["run", "run_sync", "mounts_under", "is_mountpoint", "mount_source", "pid_alive",
           "process_running", "loop_backings", "loop_devices_for", "mount_tmpfs", "unmount"]

_libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2


async def run(*argv: str | os.PathLike[str], check: bool = True, timeout: float = 120.0,
              input: bytes | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command without a shell; on failure raise `SystemError_` naming it and its stderr."""
    args = [os.fspath(a) for a in argv]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SystemError_(f"{' '.join(args[:3])} timed out after {timeout:.0f}s",
                           public=f"{_step(args)} timed out") from None
    except BaseException:  # cancelled: never leave the child running behind our back
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    result = subprocess.CompletedProcess(args, proc.returncode or 0, out, err)
    if check and proc.returncode != 0:
        raise _failed(args, proc.returncode or 0, err)
    return result


def _step(args: list[str]) -> str:
    """The command as a client may see it: the program's name, never its path or args."""
    return os.path.basename(args[0]) if args else "a command"


def _failed(args: list[str], code: int, stderr: bytes) -> SystemError_:
    return SystemError_(
        f"{' '.join(args[:3])} failed (exit {code}): "
        f"{stderr.decode(errors='replace').strip()[-500:]}",
        public=f"{_step(args)} failed (exit {code})")


def run_sync(*argv: str | os.PathLike[str], check: bool = True,
             timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
    """Blocking twin of `run` for start-up, shutdown and the CLI; never call from the loop."""
    args = [os.fspath(a) for a in argv]
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise _failed(args, result.returncode, result.stderr)
    return result


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def mounts_under(prefix: Path) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount at or below `prefix`, deepest first."""
    base = os.path.realpath(prefix)
    found: list[tuple[str, str]] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            point = _unescape(parts[4])
            fstype = parts[sep + 1]
            if point == base or point.startswith(base.rstrip("/") + "/"):
                found.append((point, fstype))
    found.sort(key=lambda m: m[0].count("/"), reverse=True)
    return found


def mount_source(path: Path) -> str | None:
    """The source (e.g. /dev/loop3) of the mount at exactly `path`, or None."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if _unescape(parts[4]) == real:
                return _unescape(parts[parts.index("-") + 2])
    return None


def is_mountpoint(path: Path, fstype: str | None = None) -> bool:
    real = os.path.realpath(path)
    for point, kind in mounts_under(Path(real)):
        if point == real and (fstype is None or kind == fstype):
            return True
    return False


def process_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (which `pid_alive` still counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def loop_backings(backing_prefix: Path) -> dict[str, str]:
    """{loop device: backing file} for loop devices whose backing file lies under
    `backing_prefix` (read from sysfs)."""
    base = os.path.realpath(backing_prefix)
    devices: dict[str, str] = {}
    for entry in Path("/sys/block").glob("loop*"):
        backing = entry / "loop" / "backing_file"
        try:
            target = backing.read_text().strip()
        except OSError:
            continue
        # the file itself, or anything below a directory: never `disk.img.restoring`
        # when asked for `disk.img`
        if target == base or target.startswith(base.rstrip("/") + "/"):
            devices["/dev/" + entry.name] = target
    return devices


def loop_devices_for(backing_prefix: Path) -> list[str]:
    """Loop devices whose backing file lies under `backing_prefix`."""
    return list(loop_backings(backing_prefix))


def mount_tmpfs(target: Path, options: str, source: str = "wisp") -> None:
    """mount(2) a tmpfs (nosuid, nodev) at `target`: a syscall, not a `mount` process."""
    if _libc.mount(source.encode(), os.fsencode(target), b"tmpfs", MS_NOSUID | MS_NODEV,
                   options.encode()) != 0:
        err = ctypes.get_errno()
        raise SystemError_(f"mounting a tmpfs at {target}: {os.strerror(err)}",
                           public=f"mounting a tmpfs failed: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """umount2(2) `target`, lazily if it is busy; nothing if it is not a mount point."""
    if not is_mountpoint(target):
        return
    if _libc.umount2(os.fsencode(target), 0) != 0 and is_mountpoint(target):
        _libc.umount2(os.fsencode(target), MNT_DETACH)
