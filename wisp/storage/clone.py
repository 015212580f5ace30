"""`juicefs clone` without starting the juicefs binary: one message through the mount's
control file.

Why: a clone is a metadata copy that the running `juicefs mount` daemon does in a few
milliseconds, but `juicefs clone` spends most of its ~50 ms starting a Go binary and then
polls for the answer with a 10 ms back-off. Checkpoints, restores and forks each clone a disk
image, so we speak the daemon's protocol ourselves (read from juicedata/juicefs
`cmd/clone.go`, `cmd/warmup.go` readProgress, `pkg/vfs/internal.go` handleInternalMsg and
`pkg/vfs/vfs.go` Write/Read of the control inode; unchanged from v1.4.0 to v1.4.2):

    request   (big-endian)  u32 cmd=1006 | u32 body length |
              u64 src inode | u64 src parent inode | u64 dst parent inode |
              u8 name length | name | u16 umask | u8 mode flags | u8 concurrency
    reply     zero or more  0xFE u64 done u64 total   (progress, every 300 ms)
              then one byte: the errno (0 = success)

The control file is `.control` in the mount root (`.jfs.control` with --prefix-internal,
which `.config` reports). The daemon echoes the request into the reply stream, so replies
start at the file offset just past the request; reads return nothing until it answers, so
the answer is polled. Closing the file cancels a clone still in progress.

Semantics are the CLI's without `-p`: the destination must not exist, both paths lie on the
same mount, and the copy gets the caller's uid/gid, the source mode less the umask and new
timestamps (`preserve=True` is `-p`: uid, gid, mode and times kept).

A daemon whose version we have not read the protocol of, or one whose reply we do not
understand, is served by the CLI instead (`juicefs clone`), logged once per mount.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from wisp.errors import SystemError_
from wisp.storage.juicefs import juicefs_binary
from wisp.system import run

__all__ = ["clone", "CloneError", "DEFAULT_TIMEOUT"]

log = logging.getLogger("wisp.storage")

DEFAULT_TIMEOUT = 120.0

_MSG_CLONE = 1006                  # meta.Clone
_CPROGRESS = 0xFE                  # meta.CPROGRESS: u64 count, u64 total follow
_CDATA = 0xFF                      # meta.CDATA: never sent for a clone
_PRESERVE_ATTR = 0x02              # meta.CLONE_MODE_PRESERVE_ATTR (the CLI's -p)
_CONCURRENCY = 4                   # meta.CLONE_DEFAULT_CONCURRENCY (the CLI's --threads)
_ROOT_INODE = 1
_CONTROL_INODE = 0x7FFFFFFF00000002  # vfs.controlInode: proves we opened the real thing
#: Versions whose daemon we checked speaks the layout above (clone came in 1.1, the
#: optional concurrency byte in 1.4, which older daemons ignore).
_KNOWN_VERSIONS = ((1, 1), (1, 4))
#: Extra wait for a worker thread stuck in a FUSE syscall past its own deadline.
_GRACE = 5.0
#: Tries through the control file before the CLI takes over (see EINTR in `clone`).
_EINTR_ATTEMPTS = 3
_POLL_FIRST = 0.0002
_POLL_MAX = 0.02


class CloneError(SystemError_):
    """A clone the JuiceFS daemon (or our checks before asking it) refused, or one it did not
    answer in time; `errno` says which (EEXIST: destination exists, ENOENT: source missing,
    EXDEV: outside the mount, ETIMEDOUT: no answer, ...). The API reports it as any
    `SystemError_` (500 system_error)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class _NotUnderstood(Exception):
    """The daemon does not speak the protocol we know: use the CLI. `sent` says whether our
    message reached it (then it may have cloned anyway)."""

    def __init__(self, reason: str, sent: bool = False) -> None:
        super().__init__(reason)
        self.sent = sent


@dataclass
class _Probe:
    """What one mounted daemon speaks; found once per (mount point, device)."""

    control: str | None        # control file path, or None: use the CLI
    reason: str = ""           # why the CLI, for the one log line
    logged: bool = False


_probes: dict[tuple[str, int], _Probe] = {}
_probe_lock = threading.Lock()


async def clone(mount_point: Path, src: Path, dst: Path, *, preserve: bool = False,
                timeout: float = DEFAULT_TIMEOUT) -> None:
    """Clone `src` to `dst` (a file or a directory tree) inside the JuiceFS volume mounted at
    `mount_point`, like `juicefs clone [-p] SRC DST`.

    Raises `CloneError` (a `SystemError_`) with the errno when the clone is refused or the
    mount does not answer within `timeout` seconds (ETIMEDOUT), and `SystemError_` when the
    CLI fallback fails. Cancelling the call closes the control file, which cancels the clone
    in the daemon.
    """
    deadline = time.monotonic() + timeout
    for attempt in range(_EINTR_ATTEMPTS):
        try:
            await _clone_once(mount_point, src, dst, preserve, deadline)
            return
        except CloneError as exc:
            # EINTR: a fork in this process closed its copy of our control file descriptor
            # (close-on-exec), the kernel sent FUSE FLUSH, and JuiceFS cancelled the clone
            # before committing anything. The CLI, a process of its own, cannot be hit.
            if exc.errno != errno.EINTR or await asyncio.to_thread(os.path.lexists, dst):
                raise
            log.info("juicefs clone %s -> %s cancelled by a concurrent fork (attempt %d)",
                     src, dst, attempt + 1)
    await _clone_via_cli(src, dst, preserve, max(1.0, deadline - time.monotonic()))


async def _clone_once(mount_point: Path, src: Path, dst: Path, preserve: bool,
                      deadline: float) -> None:
    timeout = max(0.0, deadline - time.monotonic())
    stop = threading.Event()
    worker = asyncio.ensure_future(asyncio.to_thread(
        _clone_via_control, mount_point, src, dst, preserve, deadline, stop))
    try:
        done, _ = await asyncio.wait({worker}, timeout=timeout + _GRACE)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({worker}, timeout=_GRACE)  # let it close the control file
        worker.add_done_callback(_consume)
        raise
    if not done:
        # stuck in a FUSE syscall: the thread cannot be interrupted, only abandoned; it will
        # not send the clone once it wakes up
        stop.set()
        worker.add_done_callback(_consume)
        raise CloneError(errno.ETIMEDOUT, f"juicefs clone {src} -> {dst}: the JuiceFS mount at "
                                          f"{mount_point} did not answer within {timeout:g}s")
    try:
        worker.result()
    except _NotUnderstood as exc:
        if exc.sent and await asyncio.to_thread(os.path.lexists, dst):
            log.warning("juicefs clone %s -> %s: reply not understood (%s) but the copy is "
                        "there; taking it", src, dst, exc)
            return
        remaining = max(1.0, deadline - time.monotonic())
        await _clone_via_cli(src, dst, preserve, remaining)


def _consume(task: asyncio.Future[None]) -> None:
    """Read an abandoned worker's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def _clone_via_cli(src: Path, dst: Path, preserve: bool, timeout: float) -> None:
    args: list[str | os.PathLike[str]] = [juicefs_binary(), "clone"]
    if preserve:
        args.append("--preserve")
    await run(*args, src, dst, timeout=timeout)


# -- the blocking part, run in a worker thread ------------------------------------------------

def _clone_via_control(mount_point: Path, src: Path, dst: Path, preserve: bool,
                       deadline: float, stop: threading.Event) -> None:
    """Check the paths as the CLI does, send one clone message and wait for its errno."""
    mount = os.path.abspath(mount_point)
    mst = _stat(mount, "mount point")
    if mst.st_ino != _ROOT_INODE:
        raise CloneError(errno.EINVAL, f"juicefs clone: {mount} is not the root of a JuiceFS "
                                       "mount")
    probe = _probe(mount, mst.st_dev)
    if probe.control is None:
        _log_cli_once(probe, mount)
        raise _NotUnderstood(probe.reason)

    src_abs = os.path.abspath(src)
    dst_abs = os.path.abspath(dst)
    sst = _stat(src_abs, "source")
    src_parent = _stat(os.path.dirname(src_abs), "source directory")
    dst_parent = _stat(os.path.dirname(dst_abs), "destination directory")
    # one FUSE mount is one device: a path whose device differs lies outside the volume
    # (or on something mounted inside it), which the daemon could not resolve
    for what, path, devs in (("source", src_abs, (sst.st_dev, src_parent.st_dev)),
                             ("destination", dst_abs, (dst_parent.st_dev,))):
        if path == mount or any(d != mst.st_dev for d in devs):
            raise CloneError(errno.EXDEV, f"juicefs clone: {what} {path} is not inside the "
                                          f"JuiceFS volume mounted at {mount}")
    try:
        os.lstat(dst_abs)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _os_error(exc, "destination", dst_abs) from None
    else:
        raise CloneError(errno.EEXIST, f"juicefs clone: destination {dst_abs} already exists")
    if dst_abs.startswith(src_abs.rstrip("/") + "/"):
        raise CloneError(errno.EINVAL, f"juicefs clone: destination {dst_abs} is under the "
                                       f"source {src_abs}")
    name = os.fsencode(os.path.basename(dst_abs))
    if len(name) > 255:
        raise CloneError(errno.ENAMETOOLONG, f"juicefs clone: name of {dst_abs} is too long")

    body = (struct.pack(">QQQB", sst.st_ino, src_parent.st_ino, dst_parent.st_ino, len(name))
            + name
            + struct.pack(">HBB", _umask(), _PRESERVE_ATTR if preserve else 0, _CONCURRENCY))
    message = struct.pack(">II", _MSG_CLONE, len(body)) + body

    err = _ask(probe, message, deadline, stop, f"{src_abs} -> {dst_abs}")
    if err:
        raise CloneError(err, f"juicefs clone {src_abs} -> {dst_abs} failed: "
                              f"{os.strerror(err)} ({errno.errorcode.get(err, err)})")


def _ask(probe: _Probe, message: bytes, deadline: float, stop: threading.Event,
         what: str) -> int:
    """Write `message` to the control file and return the errno the daemon answers."""
    control = probe.control
    assert control is not None
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        _give_up(probe, control, "it has no control file")
    except OSError as exc:
        raise _os_error(exc, "control file", control) from None
    try:
        if os.fstat(fd).st_ino != _CONTROL_INODE:
            _give_up(probe, control, f"{control} is not its control file")
        if stop.is_set() or time.monotonic() > deadline:
            # the caller already gave up on us (a mount that answered too late): a clone
            # made now would be one nobody knows about
            raise CloneError(errno.ETIMEDOUT, f"juicefs clone {what}: given up before sending")
        try:
            if os.write(fd, message) != len(message):
                raise CloneError(errno.EIO, f"juicefs clone {what}: short write to the "
                                            "control file")
            return _read_errno(fd, len(message), deadline, stop, what)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise CloneError(errno.EBADF, f"juicefs clone {what}: the JuiceFS mount was "
                                              "restarted during the clone") from None
            raise _os_error(exc, "control file", control) from None
        except _NotUnderstood as exc:
            _give_up(probe, control, str(exc), sent=True)
    finally:
        os.close(fd)  # also cancels a clone we stopped waiting for


def _give_up(probe: _Probe, control: str, reason: str, sent: bool = False) -> NoReturn:
    """From now on this mount is served by the CLI; say so once."""
    probe.control, probe.reason = None, reason
    _log_cli_once(probe, os.path.dirname(control))
    raise _NotUnderstood(reason, sent)


def _read_errno(fd: int, offset: int, deadline: float, stop: threading.Event,
                what: str) -> int:
    """Poll the reply stream from `offset`: skip progress records, return the final errno."""
    pending = bytearray()
    pause = _POLL_FIRST
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if chunk:
            offset += len(chunk)
            pending += chunk
            pause = _POLL_FIRST
            while pending:
                tag = pending[0]
                if tag == _CPROGRESS:
                    if len(pending) < 17:
                        break
                    del pending[:17]
                elif tag == _CDATA or len(pending) > 1:
                    raise _NotUnderstood(f"unexpected reply {bytes(pending[:24]).hex()}")
                else:
                    return tag
            continue
        if stop.is_set():
            raise CloneError(errno.ECANCELED, f"juicefs clone {what}: cancelled")
        if time.monotonic() > deadline:
            raise CloneError(errno.ETIMEDOUT, f"juicefs clone {what}: no answer from the "
                                              "JuiceFS mount in time (the clone was cancelled)")
        time.sleep(pause)
        pause = min(pause * 2, _POLL_MAX)


def _probe(mount: str, dev: int) -> _Probe:
    """Read the daemon's version and internal-file prefix from `.config`, once per mount."""
    key = (mount, dev)
    found = _probes.get(key)
    if found is not None:
        return found
    with _probe_lock:
        found = _probes.get(key)
        if found is None:
            found = _probes[key] = _read_probe(mount)
    return found


def _read_probe(mount: str) -> _Probe:
    config = None
    for name in (".config", ".jfs.config"):
        try:
            with open(os.path.join(mount, name), "rb") as f:
                config = json.loads(f.read())
            break
        except (OSError, ValueError):
            continue
    if not isinstance(config, dict):
        return _Probe(None, "its .config cannot be read")
    version = str(config.get("Version", ""))
    try:
        major_minor = tuple(int(x) for x in version.split("+")[0].split("-")[0].split(".")[:2])
    except ValueError:
        major_minor = ()
    if not _KNOWN_VERSIONS[0] <= major_minor <= _KNOWN_VERSIONS[1]:
        return _Probe(None, f"its version {version or '?'} is not one whose clone protocol "
                            "we know")
    prefix = ".jfs" if config.get("PrefixInternal") else ""
    return _Probe(os.path.join(mount, prefix + ".control"))


def _log_cli_once(probe: _Probe, mount: str) -> None:
    if not probe.logged:
        probe.logged = True
        log.warning("juicefs clone: using the juicefs CLI for the mount at %s because %s",
                    mount, probe.reason)


def _umask() -> int:
    """The process umask, read without setting it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _stat(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise _os_error(exc, what, path) from None


def _os_error(exc: OSError, what: str, path: str) -> CloneError:
    err = exc.errno or errno.EIO
    return CloneError(err, f"juicefs clone: {what} {path}: {os.strerror(err)} "
                           f"({errno.errorcode.get(err, err)})")
