"""Base images: read-only root filesystems shared by every sprite made from them.

An image's `rootfs` is the overlayfs lower layer of each of its sprites, so it is never
written after it is built. Sprites run in a user namespace that maps container ids
0..65535 to host ids 100000..165535; the rootfs is stored *already shifted* (every owner
+100000) so that no per-sprite chown or idmapped mount is needed and root inside a sprite
owns its files while owning nothing on the host.

Layout under the store root (e.g. `<data_dir>/images`):

    <name>/<version>/rootfs        the shifted root filesystem
    <name>/<version>/image.json    name, version, created, size_bytes, source, uid_base
    .tmp/<id>/                     a build (or a removal) in progress
    .tmp/<id>.lock                 flock held by that build and by every process it started

A build happens entirely in `.tmp/<id>/` and becomes visible with one rename, so a reader
sees a complete image or none. A build killed at any point leaves only `.tmp` entries whose
lock nobody holds; the next build deletes them. The lock is also handed to the build's
child processes (debootstrap, tar, cp), so an orphaned debootstrap still writing is never
deleted under its feet.

Every image gets the same fix-ups, whatever its source: a `sprite` user (uid/gid 1000,
home /home/sprite), root in /etc/passwd, /etc/hostname, /etc/resolv.conf, /etc/hosts,
an empty /.wisp (the init agent's mount point), /tmp mode 1777, and, where sudo is
installed, passwordless sudo for `sprite`. Device nodes are removed (the runtime provides
/dev) and `trusted.overlay.*` xattrs are stripped (they would change overlayfs semantics).

Imported content is untrusted: every path the fix-ups touch is resolved as if chrooted
into the rootfs, so an image whose /etc is a symlink to /etc can never make host root
write the host's files, and tar members are checked before a single byte is written.

The API is blocking; the server calls it through `asyncio.to_thread`, the CLI directly.
"""

from __future__ import annotations

import bz2
import collections
import ctypes
import errno
import fcntl
import gzip
import json
import lzma
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from wisp.errors import BadRequest, Conflict, InvalidName, NotFound, SystemError_, WispError
from wisp.runtime.base import ID_RANGE, ROOT_UID_BASE, SPRITE_HOME, SPRITE_UID
from wisp.system import mounts_under, run_sync

__all__ = ["Image", "ImageStore"]

Progress = Callable[[str], None]

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
VERSION_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")
SUITE_RE = re.compile(r"[a-z][a-z0-9.-]{0,31}")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEBIAN_PACKAGES = ("ca-certificates", "curl", "git", "python3", "procps", "iproute2", "less",
                   "vim-tiny", "sudo", "iputils-ping")
HOST_BUSYBOX = Path("/bin/busybox")
SPRITE_USER = "sprite"
SPRITE_SHELLS = ("/bin/bash", "/bin/sh")
IMAGE_FORMAT = 1

#: Generous ceilings: a slow mirror can make debootstrap take many minutes.
DEBOOTSTRAP_TIMEOUT = 3600.0
EXTRACT_TIMEOUT = 3600.0
#: A clean, fixed environment for build tools (the server's own env may be minimal).
TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C",
            "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


@dataclass(frozen=True)
class Image:
    """One immutable version of a base image.

    `rootfs` is read-only by contract: it is the lower layer of live overlays. `created`
    is RFC 3339 UTC to the second; `size_bytes` is disk usage (hard links counted once).
    """

    name: str
    version: str
    rootfs: Path
    created: str
    size_bytes: int
    source: str


class ImageStore:
    """Every image version under one directory; safe to share between processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- reading -------------------------------------------------------------------------

    def list(self) -> list[Image]:
        """Every complete version, grouped by name (a-z), newest first within a name."""
        if not self.root.is_dir():
            return []
        found: list[Image] = []
        for name_dir in self.root.iterdir():
            if not NAME_RE.fullmatch(name_dir.name) or not name_dir.is_dir():
                continue
            try:
                version_dirs = list(name_dir.iterdir())
            except FileNotFoundError:
                continue  # its last version was removed just now
            for version_dir in version_dirs:
                if VERSION_RE.fullmatch(version_dir.name):
                    image = _load(version_dir, name_dir.name)
                    if image is not None:
                        found.append(image)
        found.sort(key=lambda i: i.version, reverse=True)
        found.sort(key=lambda i: i.name)
        return found

    def latest(self, name: str) -> Image | None:
        _check_name(name)
        versions = [i for i in self.list() if i.name == name]
        return versions[0] if versions else None

    def get(self, name: str, version: str) -> Image | None:
        _check_name(name)
        if not VERSION_RE.fullmatch(version):
            return None
        return _load(self.root / name / version, name)

    # ---- building ------------------------------------------------------------------------

    def build_debian(self, name: str = "debian", suite: str = "bookworm",
                     mirror: str | None = None,
                     progress: Progress | None = None) -> Image:
        """debootstrap a minbase Debian with the tools a sprite user expects (a few minutes).

        Every line debootstrap prints goes to `progress`. debootstrap runs in a private
        mount namespace, so the /proc and /sys it mounts in the target vanish with it even
        when it is killed, and deleting a failed build can never reach the host's /dev.
        """
        _check_name(name)
        if not SUITE_RE.fullmatch(suite):
            raise BadRequest(f"invalid Debian suite {suite!r}")
        mirror = mirror or _default_mirror()
        if not re.fullmatch(r"(https?|file)://\S+", mirror):
            raise BadRequest(f"mirror must be an http(s):// or file:// URL, not {mirror!r}")
        for tool in ("debootstrap", "unshare"):
            if shutil.which(tool, path=TOOL_ENV["PATH"]) is None:
                raise SystemError_(f"{tool} is not installed; it is needed to build Debian images")
        say = progress or _quiet
        with self._scratch() as work:
            rootfs = work.make_rootfs()
            say(f"debootstrap {suite} from {mirror}")
            _run_tool(["unshare", "--mount", "--propagation", "private", "--",
                       "debootstrap", "--variant=minbase",
                       "--include=" + ",".join(DEBIAN_PACKAGES), suite, str(rootfs), mirror],
                      lock_fd=work.fd, timeout=DEBOOTSTRAP_TIMEOUT, progress=say)
            say("removing apt caches and package lists")
            _clean_apt(rootfs)
            # debootstrap copies the host's resolver config and hostname; neither belongs
            # in a shared image (the runtime provides the sprite's own).
            _write_file(rootfs, "/etc/resolv.conf", b"")
            return self._finish(work, name, f"debootstrap {suite}", say, sudo=True)

    def build_busybox(self, name: str = "busybox") -> Image:
        """A tiny image from the host's static busybox; builds in well under a second."""
        _check_name(name)
        if not HOST_BUSYBOX.is_file():
            raise SystemError_(f"{HOST_BUSYBOX} is missing; install busybox-static")
        if _elf_interpreter(HOST_BUSYBOX):
            raise SystemError_(f"{HOST_BUSYBOX} is dynamically linked; install busybox-static")
        listing = run_sync(HOST_BUSYBOX, "--list", timeout=30).stdout.decode()
        applets = [a for a in listing.split() if a != "busybox" and "/" not in a
                   and a not in (".", "..")]
        with self._scratch() as work:
            _busybox_tree(work.make_rootfs(), applets)
            return self._finish(work, name, "busybox", _quiet, sudo=False)

    def import_(self, name: str, source: Path, progress: Progress | None = None) -> Image:
        """An image from a rootfs directory or a tarball (e.g. from `docker export`).

        Owners are taken as they are in the source (numeric, container ids 0..65535) and
        shifted; an id outside that range cannot be mapped into a sprite and is refused,
        which also refuses a source that is already shifted. The source is never modified.
        """
        _check_name(name)
        say = progress or _quiet
        source = Path(source).absolute()
        if source.is_dir():
            src_real = os.path.realpath(source)
            root_real = os.path.realpath(self.root)
            if root_real == src_real or root_real.startswith(src_real.rstrip("/") + "/"):
                raise BadRequest(f"cannot import {source}: the image store lies inside it")
            with self._scratch() as work:
                rootfs = work.make_rootfs()
                say(f"copying {source}")
                _run_tool(["cp", "-a", "--one-file-system", "--", f"{source}/.", f"{rootfs}/"],
                          lock_fd=work.fd, timeout=EXTRACT_TIMEOUT, progress=say)
                return self._finish(work, name, f"import {source}", say, sudo=None)
        if source.is_file() and source.name.endswith(TAR_SUFFIXES):
            say(f"checking {source}")
            count = _check_archive(source)
            with self._scratch() as work:
                rootfs = work.make_rootfs()
                say(f"extracting {count} entries")
                _extract(source, rootfs, work.fd)
                return self._finish(work, name, f"import {source}", say, sudo=None)
        raise BadRequest(f"cannot import {source}: expected a rootfs directory or a "
                         f"{'/'.join(TAR_SUFFIXES)} file")

    # ---- removing ------------------------------------------------------------------------

    def remove(self, name: str, version: str) -> None:
        """Delete one version. Refused (Conflict) while a mounted overlay uses it.

        The version disappears from `list` at once (it is first renamed into `.tmp`); only
        mounted overlays are seen here, so the caller must also refuse images that stopped
        sprites still record as their base.
        """
        _check_name(name)
        version_dir = self.root / name / version
        if not VERSION_RE.fullmatch(version) or _load(version_dir, name) is None:
            raise NotFound(f"image {name}:{version} not found")
        if _used_as_lower(version_dir / "rootfs"):
            raise Conflict(f"image {name}:{version} is in use by a mounted sprite")
        with self._scratch() as work:
            try:
                os.rename(version_dir, work.path / "image")
            except FileNotFoundError:
                raise NotFound(f"image {name}:{version} not found") from None
        try:
            (self.root / name).rmdir()
        except OSError:
            pass  # other versions remain, or a build is adding one right now

    # ---- internals -----------------------------------------------------------------------

    @contextmanager
    def _scratch(self) -> Iterator[_Scratch]:
        """A locked, private directory under `.tmp`, deleted on the way out unless renamed."""
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        _clean_tmp(tmp_root)
        work = _Scratch.create(tmp_root)
        try:
            yield work
        except WispError:
            raise
        except OSError as exc:
            raise SystemError_(f"image build failed: {exc}") from exc
        finally:
            work.release()

    def _finish(self, work: _Scratch, name: str, source: str, say: Progress,
                sudo: bool | None) -> Image:
        """Fix-ups, owner shift, durable write, then the one rename that publishes it."""
        rootfs = work.path / "rootfs"
        say("configuring the sprite user")
        _configure(rootfs, sudo)
        say(f"shifting owners by {ROOT_UID_BASE}")
        size = _shift_tree(rootfs)
        name_dir = self.root / name
        for _attempt in range(20):
            version, created = _new_version()
            image = Image(name=name, version=version, rootfs=name_dir / version / "rootfs",
                          created=created, size_bytes=size, source=source)
            (work.path / "image.json").write_text(json.dumps({
                "format": IMAGE_FORMAT, "name": name, "version": version, "created": created,
                "size_bytes": size, "source": source, "uid_base": ROOT_UID_BASE,
            }, indent=2) + "\n")
            os.chmod(work.path / "image.json", 0o644)
            _syncfs(work.path)
            name_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(work.path, name_dir / version)
            except FileNotFoundError:
                continue  # a removal deleted the empty name dir in between
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # same microsecond as another build
                raise
            _fsync_dir(name_dir)
            say(f"image {name}:{version} ready ({size // (1 << 20)} MiB)")
            return image
        raise SystemError_(f"could not publish image {name}: no free version id")


class _Scratch:
    """`.tmp/<id>/` plus the flocked `.tmp/<id>.lock` that marks it as alive."""

    def __init__(self, path: Path, lock: Path, fd: int) -> None:
        self.path = path
        self.lock = lock
        self.fd = fd

    @classmethod
    def create(cls, tmp_root: Path) -> _Scratch:
        for _attempt in range(20):
            ident = secrets.token_hex(8)
            lock = tmp_root / f"{ident}.lock"
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A cleaner may have taken the fresh lock for a stale one and unlinked it.
                if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError(lock)
                path = tmp_root / ident
                _mkdir(path)
                return cls(path, lock, fd)
            except (BlockingIOError, FileNotFoundError, FileExistsError):
                os.close(fd)
        raise SystemError_(f"could not create a build directory in {tmp_root}")

    def make_rootfs(self) -> Path:
        rootfs = self.path / "rootfs"
        _mkdir(rootfs)
        return rootfs

    def release(self) -> None:
        try:
            if os.path.lexists(self.path):
                _remove_tree(self.path)
            self.lock.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


def _clean_tmp(tmp_root: Path) -> None:
    """Delete what dead builds left; a lock somebody holds marks a live build."""
    entries = list(os.scandir(tmp_root))
    for entry in entries:
        if entry.name.endswith(".lock"):
            try:
                fd = os.open(entry.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    if os.stat(entry.path).st_ino != os.fstat(fd).st_ino:
                        continue
                except FileNotFoundError:
                    continue
                leftover = tmp_root / entry.name[: -len(".lock")]
                if os.path.lexists(leftover):
                    _remove_tree(leftover)
                os.unlink(entry.path)
            finally:
                os.close(fd)
        elif not os.path.lexists(f"{entry.path}.lock"):
            # A build creates its lock before its directory and drops it last, so an
            # entry without a lock is the remnant of a killed cleaner or removal.
            _remove_tree(Path(entry.path))


def _remove_tree(path: Path) -> None:
    """rmtree that first detaches anything mounted below (rmtree would walk into it).

    A symlink is only unlinked: its target (maybe "/", in an imported image) is never
    looked at, let alone unmounted or deleted.
    """
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    for point, _kind in mounts_under(path):
        run_sync("umount", "-l", point, check=False, timeout=60)
    left = mounts_under(path)
    if left:
        raise SystemError_(f"cannot delete {path}: still mounted below it: {left[0][0]}")
    shutil.rmtree(path)


def _load(version_dir: Path, name: str) -> Image | None:
    """The image in `version_dir`, or None when it is absent or not a complete image."""
    try:
        meta = json.loads((version_dir / "image.json").read_text())
        image = Image(name=str(meta["name"]), version=str(meta["version"]),
                      rootfs=version_dir / "rootfs", created=str(meta["created"]),
                      size_bytes=int(meta["size_bytes"]), source=str(meta["source"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if image.name != name or image.version != version_dir.name:
        return None
    return image


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid image name {name!r}: use 1-63 of a-z 0-9 . _ -, "
                          "starting with a letter or digit")


def _new_version() -> tuple[str, str]:
    """(version, created) from one clock reading; the 6 hex digits are its microseconds,
    so versions sort by creation time even within one second."""
    now = time.time()
    secs = int(now)
    micros = int((now - secs) * 1_000_000)
    stamp = time.gmtime(secs)
    return (time.strftime("%Y%m%dT%H%M%SZ", stamp) + f"-{micros:06x}",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", stamp))


def _quiet(_line: str) -> None:
    pass


def _default_mirror() -> str:
    """The host's own Debian mirror (first `URIs:` of debian.sources), else the CDN."""
    try:
        text = DEBIAN_SOURCES.read_text()
    except OSError:
        return DEFAULT_MIRROR
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key.strip().lower() == "uris" and value.split():
            return value.split()[0]
    return DEFAULT_MIRROR


# ---- host processes ------------------------------------------------------------------------

def _run_tool(argv: Sequence[str], lock_fd: int, timeout: float, progress: Progress,
              stdin_feed: Callable[[IO[bytes]], None] | None = None) -> None:
    """Run a build tool in its own process group, streaming its output lines to `progress`.

    Unlike `wisp.system.run_sync` this hands the build's lock fd to the tool (so a tool
    orphaned by a killed build keeps its directory alive) and streams output. On timeout,
    on an exception from `progress` or `stdin_feed`, the whole group is killed.
    """
    output = tempfile.TemporaryFile() if stdin_feed is not None else None
    try:
        proc = subprocess.Popen(
            list(argv), env=TOOL_ENV, start_new_session=True, pass_fds=(lock_fd,), umask=0o022,
            stdin=subprocess.PIPE if stdin_feed is not None else subprocess.DEVNULL,
            stdout=output if output is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT)
    except OSError as exc:
        if output is not None:
            output.close()
        raise SystemError_(f"cannot run {argv[0]}: {exc}") from exc
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _kill_group(proc.pid)

    timer = threading.Timer(timeout, on_timeout)
    timer.daemon = True
    timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=15)
    try:
        if stdin_feed is not None:
            assert proc.stdin is not None
            try:
                stdin_feed(proc.stdin)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the tool died; its exit status says why
        else:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    tail.append(line)
                    progress(line)
        # Reap only after killing the group: until then the exited leader's pid (which is
        # the group id) cannot be reused, so no unrelated process can be hit.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        timer.cancel()
        _kill_group(proc.pid)  # helpers it left running (none expected)
        returncode = proc.wait()
    except BaseException:
        timer.cancel()
        _kill_group(proc.pid)
        proc.wait()
        if output is not None:
            output.close()
        raise
    finally:
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
    if output is not None:
        output.seek(0)
        tail.extend(output.read().decode(errors="replace").splitlines()[-15:])
        output.close()
    _wait_group_gone(proc.pid)
    if timed_out.is_set():
        raise SystemError_(f"{argv[0]} timed out after {timeout:.0f}s")
    if returncode != 0:
        name = argv[argv.index("--") + 1] if "--" in argv and argv[0] == "unshare" else argv[0]
        raise SystemError_(f"{name} failed (exit {returncode}): " + " | ".join(tail)[-1500:])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, limit: float = 10.0) -> None:
    """Wait until the tool's helpers (e.g. dpkg under debootstrap) have exited too."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


_libc: ctypes.CDLL | None = None


def _syncfs(path: Path) -> None:
    """Flush the one filesystem holding `path` (never a global sync(), which can hang)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _used_as_lower(rootfs: Path) -> bool:
    """True when a mounted overlay (in our mount namespace) has `rootfs` as a lower dir."""
    target = os.path.realpath(rootfs)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            _, sep, tail = line.partition(" - ")
            fields = tail.split()
            if not sep or len(fields) < 3 or fields[0] != "overlay":
                continue
            for option in fields[2].split(","):
                if option.startswith("lowerdir="):
                    for lower in option[len("lowerdir="):].split(":"):
                        lower = lower.replace("\\040", " ").replace("\\134", "\\")
                        if lower and os.path.realpath(lower) == target:
                            return True
    return False


def _elf_interpreter(path: Path) -> bool:
    """True when the ELF file asks for a dynamic loader (has a PT_INTERP header)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # only 64-bit ELF is expected here
            return False
        endian = "<" if head[5] == 1 else ">"
        phoff = struct.unpack_from(endian + "Q", head, 0x20)[0]
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from(endian + "I", table, i * phentsize)[0] == 3
               for i in range(phnum))


# ---- archives ------------------------------------------------------------------------------

def _open_archive(path: Path) -> IO[bytes]:
    """The tar stream inside `path`, decompressed by its magic bytes (not its suffix)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:2] == b"\x1f\x8b":
        return cast(IO[bytes], gzip.open(path, "rb"))
    if head == b"\xfd7zXZ\x00":
        return cast(IO[bytes], lzma.open(path, "rb"))
    if head[:3] == b"BZh":
        return cast(IO[bytes], bz2.open(path, "rb"))
    return open(path, "rb")


_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, ValueError,
                   gzip.BadGzipFile)


def _member_path(raw: str, what: str = "member") -> str:
    """The archive path made relative and canonical; absolute paths and `..` are refused."""
    if raw.startswith("/"):
        raise BadRequest(f"archive {what} {raw!r} has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadRequest(f"archive {what} {raw!r} climbs out of the image with '..'")
    return "/".join(parts)


def _check_archive(path: Path) -> int:
    """Read every header before anything is written; return the member count.

    Refused: absolute names, `..`, hard links to such names, any member (or hard link
    target) whose path goes through a symlink of the archive (extraction would write
    through it wherever it points), and ids that no sprite can map. Symlinks themselves
    may point anywhere: they are only ever resolved inside a sprite.
    """
    symlinks: set[str] = set()
    written: list[str] = []
    count = 0
    try:
        with _open_archive(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                count += 1
                name = _member_path(member.name)
                if name == "" and not member.isdir():
                    raise BadRequest("archive member '.' must be a directory")
                for kind, ident in (("uid", member.uid), ("gid", member.gid)):
                    if not 0 <= ident < ID_RANGE:
                        raise BadRequest(f"archive member {member.name!r} has {kind} {ident}, "
                                         f"outside 0..{ID_RANGE - 1}")
                if member.issym():
                    symlinks.add(name)
                elif member.islnk():
                    target = _member_path(member.linkname, "hard link target")
                    if target == "":
                        raise BadRequest(f"archive member {member.name!r} links to '.'")
                    written.append(target)
                    if target in symlinks:
                        symlinks.add(name)
                written.append(name)
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc}") from exc
    except _ARCHIVE_ERRORS as exc:
        raise BadRequest(f"{path} is not a valid tar archive: {exc}") from exc
    if count == 0:
        raise BadRequest(f"{path} is an empty archive")
    for name in written:
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in symlinks:
                raise BadRequest(f"archive member {name!r} would be written through "
                                 f"the symlink {prefix!r}")
    return count


def _extract(path: Path, rootfs: Path, lock_fd: int) -> None:
    """GNU tar as root, numeric owners, modes and file capabilities kept.

    Python decompresses and feeds tar's stdin, so the bytes tar sees are exactly those
    `_check_archive` read and no host decompressor is needed. GNU tar is a second line of
    defence: it never writes outside `-C` and defers unsafe symlinks to the end.
    """
    def feed(pipe: IO[bytes]) -> None:
        try:
            with _open_archive(path) as stream:
                shutil.copyfileobj(stream, pipe, 1 << 20)
        except _ARCHIVE_ERRORS as exc:
            raise BadRequest(f"{path} is not a valid tar archive: {exc}") from exc

    _run_tool(["tar", "--extract", "--file=-", f"--directory={rootfs}", "--numeric-owner",
               "--same-owner", "--same-permissions", "--xattrs",
               "--xattrs-include=security.capability", "--xattrs-include=user.*"],
              lock_fd=lock_fd, timeout=EXTRACT_TIMEOUT, progress=_quiet, stdin_feed=feed)


# ---- paths inside an untrusted rootfs ------------------------------------------------------

def _resolve(rootfs: Path, path: str, follow_last: bool = True) -> Path:
    """Host path of `path` as seen by a process chrooted into `rootfs`.

    Symlinks (absolute ones included) resolve against `rootfs`, `..` stops at it, so the
    result always lies inside `rootfs`; missing components are kept as they are.
    """
    pending = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = rootfs.joinpath(*done, part)
        if pending or follow_last:
            try:
                is_link = stat.S_ISLNK(os.lstat(here).st_mode)
            except FileNotFoundError:
                is_link = False
            if is_link:
                hops += 1
                if hops > 40:
                    raise BadRequest(f"too many symlinks resolving {path} in the image")
                target = os.readlink(here)
                if target.startswith("/"):
                    done = []
                pending = [p for p in target.split("/") if p not in ("", ".")] + pending
                continue
        done.append(part)
    return rootfs.joinpath(*done)


def _mkdir(path: Path, mode: int = 0o755) -> None:
    """mkdir with exactly `mode`: the server's umask must not leak into an image."""
    os.mkdir(path)
    os.chmod(path, mode)


def _makedirs(path: Path) -> None:
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        _mkdir(p)


def _is_file(rootfs: Path, path: str) -> bool:
    return _resolve(rootfs, path).is_file()


def _ensure_dir(rootfs: Path, path: str, mode: int, uid: int = 0, gid: int = 0,
                fix: bool = False) -> tuple[Path, bool]:
    """Make `path` a directory (replacing a non-directory); (host path, created?).

    Existing directories keep their owner and mode unless `fix` is set.
    """
    parent = _resolve(rootfs, os.path.dirname(path.rstrip("/")) or "/")
    here = parent / os.path.basename(path.rstrip("/"))
    try:
        st = os.lstat(here)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        target = _resolve(rootfs, path)
        if target.is_dir():
            here, st = target, os.lstat(target)
        else:
            os.unlink(here)
            st = None
    elif st is not None and not stat.S_ISDIR(st.st_mode):
        os.unlink(here)
        st = None
    if st is None:
        _makedirs(parent)
        os.mkdir(here)
    if st is None or fix:
        os.chown(here, uid, gid, follow_symlinks=False)
        os.chmod(here, mode)
    return here, st is None


def _write_file(rootfs: Path, path: str, data: bytes, mode: int = 0o644, uid: int = 0,
                gid: int = 0) -> None:
    """Atomically put a regular file at `path` (a symlink there is replaced, not followed)."""
    parent = _resolve(rootfs, os.path.dirname(path) or "/")
    _makedirs(parent)
    final = parent / os.path.basename(path)
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".wisp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_table(rootfs: Path, path: str) -> tuple[list[list[str]], int, int, int] | None:
    """Rows of a colon-separated file (passwd, group, ...) with its mode, uid and gid."""
    here = _resolve(rootfs, path)
    try:
        st = os.lstat(here)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None  # a FIFO would block the build forever; it gets replaced instead
    text = here.read_text(errors="surrogateescape")
    rows = [line.split(":") for line in text.splitlines() if line.strip()]
    return rows, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _write_table(rootfs: Path, path: str, rows: list[list[str]], mode: int, uid: int,
                 gid: int) -> None:
    text = "".join(":".join(row) + "\n" for row in rows)
    _write_file(rootfs, path, text.encode(errors="surrogateescape"), mode, uid, gid)


# ---- the image contract --------------------------------------------------------------------

def _configure(rootfs: Path, sudo: bool | None) -> None:
    """Apply every image's invariants with unshifted (container) ids.

    `sudo=None` means "if sudo is installed". Another account holding uid or gid 1000 (say
    `ubuntu`) is dropped so that uid 1000 always *is* `sprite`; its files become sprite's.
    """
    if sudo is None:
        sudo = _is_file(rootfs, "/usr/bin/sudo")
    shell = next((s for s in SPRITE_SHELLS if _is_file(rootfs, s)), "/bin/sh")
    uid = str(SPRITE_UID)

    for d, mode in (("/etc", 0o755), ("/proc", 0o555), ("/sys", 0o555), ("/dev", 0o755),
                    ("/run", 0o755), ("/root", 0o700), ("/home", 0o755)):
        _ensure_dir(rootfs, d, mode)
    _ensure_dir(rootfs, "/tmp", 0o1777, fix=True)
    wisp_dir = rootfs / ".wisp"
    if os.path.lexists(wisp_dir):
        _remove_tree(wisp_dir)
    _mkdir(wisp_dir)

    table = _read_table(rootfs, "/etc/passwd")
    rows, mode, fuid, fgid = table if table else ([], 0o644, 0, 0)
    dropped_users = {r[0] for r in rows if r[0] == SPRITE_USER or (len(r) > 2 and r[2] == uid)}
    rows = [r for r in rows if r[0] not in dropped_users]
    if not any(r[0] == "root" for r in rows):
        rows.insert(0, ["root", "x", "0", "0", "root", "/root", shell])
    rows.append([SPRITE_USER, "x", uid, uid, "Sprite", SPRITE_HOME, shell])
    _write_table(rootfs, "/etc/passwd", rows, mode, fuid, fgid)

    table = _read_table(rootfs, "/etc/group")
    rows, mode, fuid, fgid = table if table else ([], 0o644, 0, 0)
    dropped_groups = {r[0] for r in rows if r[0] == SPRITE_USER or (len(r) > 2 and r[2] == uid)}
    rows = [r for r in rows if r[0] not in dropped_groups]
    if not any(r[0] == "root" for r in rows):
        rows.insert(0, ["root", "x", "0", ""])
    rows.append([SPRITE_USER, "x", uid, ""])
    if sudo:
        if not any(r[0] == "sudo" for r in rows):
            rows.append(["sudo", "x", "27", ""])
        rows = [_add_member(r, 3) if r[0] == "sudo" else r for r in rows]
    _write_table(rootfs, "/etc/group", rows, mode, fuid, fgid)

    table = _read_table(rootfs, "/etc/shadow")
    if table:
        rows, mode, fuid, fgid = table
        rows = [r for r in rows if r[0] not in dropped_users]
        rows.append([SPRITE_USER, "*", "", "", "", "", "", "", ""])  # no password, no aging
        _write_table(rootfs, "/etc/shadow", rows, mode, fuid, fgid)
    table = _read_table(rootfs, "/etc/gshadow")
    if table:
        rows, mode, fuid, fgid = table
        rows = [r for r in rows if r[0] not in dropped_groups]
        rows.append([SPRITE_USER, "!", "", ""])
        if sudo:
            rows = [_add_member(r, 3) if r[0] == "sudo" else r for r in rows]
        _write_table(rootfs, "/etc/gshadow", rows, mode, fuid, fgid)

    if sudo:
        _ensure_dir(rootfs, "/etc/sudoers.d", 0o755)
        _write_file(rootfs, "/etc/sudoers.d/sprite",
                    f"{SPRITE_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n".encode(), 0o440)

    home, created = _ensure_dir(rootfs, SPRITE_HOME, 0o755, SPRITE_UID, SPRITE_UID, fix=True)
    skel = _resolve(rootfs, "/etc/skel")
    if created and skel.is_dir():
        _copy_skel(skel, home)

    _write_file(rootfs, "/etc/hostname", b"sprite\n")
    resolv = _resolve(rootfs, "/etc", True) / "resolv.conf"
    if not resolv.is_file() or resolv.is_symlink():
        _write_file(rootfs, "/etc/resolv.conf", b"")
    if not _is_file(rootfs, "/etc/hosts"):
        _write_file(rootfs, "/etc/hosts",
                    b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")


def _add_member(row: list[str], index: int) -> list[str]:
    row = row + [""] * (index + 1 - len(row))
    members = [m for m in row[index].split(",") if m]
    if SPRITE_USER not in members:
        members.append(SPRITE_USER)
    row[index] = ",".join(members)
    return row


def _copy_skel(skel: Path, home: Path) -> None:
    """Regular files and directories only: a FIFO or device in skel is not copied."""
    for entry in os.scandir(skel):
        target = home / entry.name
        if entry.is_dir(follow_symlinks=False):
            _mkdir(target)
            _copy_skel(Path(entry.path), target)
        elif entry.is_file(follow_symlinks=False):
            shutil.copyfile(entry.path, target, follow_symlinks=False)
            os.chmod(target, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
        else:
            continue
        os.chown(target, SPRITE_UID, SPRITE_UID, follow_symlinks=False)


def _busybox_tree(rootfs: Path, applets: list[str]) -> None:
    for d, mode in (("", 0o755), ("bin", 0o755), ("usr", 0o755), ("usr/bin", 0o755),
                    ("sbin", 0o755), ("usr/sbin", 0o755), ("etc", 0o755), ("proc", 0o555),
                    ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("root", 0o700),
                    ("home", 0o755), ("run", 0o755), ("var", 0o755)):
        path = rootfs / d
        if d:
            path.mkdir()
        os.chmod(path, mode)
    shutil.copyfile(HOST_BUSYBOX, rootfs / "bin" / "busybox")
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    for applet in applets:
        os.symlink("busybox", rootfs / "bin" / applet)
    _write_file(rootfs, "/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    _write_file(rootfs, "/etc/group", b"root:x:0:\nnogroup:x:65534:\n")


def _clean_apt(rootfs: Path) -> None:
    """What `apt-get clean` plus `rm -rf /var/lib/apt/lists/*` would do."""
    archives = _resolve(rootfs, "/var/cache/apt/archives")
    for deb in archives.glob("*.deb"):
        deb.unlink()
    for cache in _resolve(rootfs, "/var/cache/apt").glob("*.bin"):
        cache.unlink()
    lists = _resolve(rootfs, "/var/lib/apt/lists")
    if lists.is_dir():
        for entry in lists.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


# ---- the owner shift -----------------------------------------------------------------------

_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_NAMED = (0x02, 0x08)  # ACL_USER, ACL_GROUP carry an id


def _shift_tree(rootfs: Path) -> int:
    """Add ROOT_UID_BASE to every owner below `rootfs`; return its disk usage in bytes.

    chown clears setuid/setgid bits and file capabilities even for root, so both are put
    back. Hard links are shifted once. Device nodes are removed (the runtime mounts its
    own /dev) and overlayfs's private xattrs dropped. A mount inside the tree (which would
    mean shifting a foreign filesystem) or an id outside 0..65535 aborts the build.
    """
    root_st = os.lstat(rootfs)
    seen: set[int] = set()
    total = _shift_one(str(rootfs), root_st, seen)
    stack = [str(rootfs)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if st.st_dev != root_st.st_dev:
                    raise SystemError_(f"{entry.path} is on another filesystem (a mount?)")
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                total += _shift_one(entry.path, st, seen)
    return total


def _shift_one(path: str, st: os.stat_result, seen: set[int]) -> int:
    mode = st.st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        os.unlink(path)
        return 0
    if st.st_nlink > 1 and not stat.S_ISDIR(mode):
        if st.st_ino in seen:
            return 0
        seen.add(st.st_ino)
    for kind, ident in (("uid", st.st_uid), ("gid", st.st_gid)):
        if ident >= ID_RANGE:
            rel = path.split("/rootfs", 1)[-1] or "/"
            raise BadRequest(f"{rel} has {kind} {ident}, outside 0..{ID_RANGE - 1}: a sprite "
                             "cannot map it (is the source already shifted?)")
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    saved: dict[str, bytes] = {}
    for attr in names:
        if attr.startswith("trusted.overlay."):
            os.removexattr(path, attr, follow_symlinks=False)
        elif attr == "security.capability":
            saved[attr] = os.getxattr(path, attr, follow_symlinks=False)
        elif attr in _ACL_XATTRS:
            saved[attr] = _shift_acl(os.getxattr(path, attr, follow_symlinks=False), path)
    os.chown(path, st.st_uid + ROOT_UID_BASE, st.st_gid + ROOT_UID_BASE, follow_symlinks=False)
    if not stat.S_ISLNK(mode):
        if mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(mode))
        for attr, value in saved.items():
            os.setxattr(path, attr, value, follow_symlinks=False)
    return st.st_blocks * 512


def _shift_acl(value: bytes, path: str) -> bytes:
    """POSIX ACL xattr (version 2 header, then tag u16, perm u16, id u32 per entry)."""
    out = bytearray(value)
    for off in range(4, len(out) - 7, 8):
        tag, _perm, ident = struct.unpack_from("<HHI", out, off)
        if tag in _ACL_NAMED:
            if ident >= ID_RANGE:
                raise BadRequest(f"an ACL of {path} names id {ident}, outside 0..{ID_RANGE - 1}")
            struct.pack_into("<I", out, off + 4, ident + ROOT_UID_BASE)
    return bytes(out)
