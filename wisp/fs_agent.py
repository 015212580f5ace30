"""The privileged side of the filesystem API: a fork server that runs each file operation
inside a sprite's root, as the sprite's own user.

Why a separate process: the sprite's root filesystem is an overlay mounted on the host, and a
server that opened paths in it as host root would follow the sprite's symlinks (`/etc/x ->
/host/secret`) and `..` out of it, and would ignore the sprite's permissions. Here every
operation runs in a throw-away worker process that

1. opens the sprite's root directory by its host path while still host root (so host
   directories above it need not be searchable by the sprite's ids),
2. enters a user namespace whose ids 0..65535 map onto the sprite's host ids 100000.. (the
   mapping the container runs under),
3. chroots into the sprite's root through that directory fd,
4. becomes the sprite user (host uid 101000) with no capabilities, or, for `asRoot`, the
   sprite's root (host uid 100000) holding only the file capabilities chown, dac_override,
   dac_read_search, fowner and fsetid - which the kernel honours only for files owned by
   ids of the sprite's range (bounding set cut to match, no_new_privs set),
5. cuts off every Python import that could read files (the stdlib is not reachable after
   the chroot, and the sprite's files must never be imported), and only then resolves the
   caller's path.

So absolute symlinks and `..` resolve inside the sprite, permission checks are the kernel's
own, and chown cannot hand a file to an id outside the sprite's range (EINVAL). Names in
chown are read from the sprite's /etc/passwd and /etc/group as text, never through NSS
(which would load libraries from the sprite).

Process tree: the zygote (host root, never chrooted, so it never holds a sprite's mount busy)
creates the user namespace once per id range and keeps it alive by an fd; per operation it
forks one worker, which `setns`es into it. A fork costs about a millisecond, against ~40 ms
for starting a fresh interpreter per operation.

This file imports only the standard library and is run as a script (`python -I -S
fs_agent.py FD`): FD is a SOCK_SEQPACKET control socket on which the server sends one
message per operation, `{setup JSON}` with one fd attached (a stream socket to the server).
The zygote exits when that socket closes (the server closed it, or exited in any way).

Wire protocol on the stream socket, in frames `type(1) | length(4, big endian) | payload`:
`J` JSON, `D` raw bytes, `E` end. Request: `J {"op", "args"}`, any `D` frames (write data),
`E`. Reply: `J {"ok": true, "result": {...}, "stream": bool}` followed, when streaming, by
`D` frames and `E`; or `J {"ok": false, "code", "error", "path"}`. A failure in the middle
of a stream is a `J` error frame in place of the `E`.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import importlib.machinery
import json
import os
import posixpath
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["ERRNO_CODES", "MAX_FRAME", "main"]

#: errno -> contract error code (§1.2 b). Anything missing is reported as EIO.
ERRNO_CODES: dict[int, str] = {
    errno.ENOENT: "ENOENT",
    errno.EEXIST: "EEXIST",
    errno.ENOTDIR: "ENOTDIR",
    errno.EISDIR: "EISDIR",
    errno.EACCES: "EACCES",
    errno.EPERM: "EPERM",
    errno.EROFS: "EPERM",
    errno.ENOTEMPTY: "ENOTEMPTY",
    errno.EINVAL: "EINVAL",
    errno.ELOOP: "EINVAL",
    errno.ENAMETOOLONG: "EINVAL",
    errno.ENXIO: "EINVAL",
    errno.EXDEV: "EINVAL",
    errno.EBUSY: "EINVAL",
    errno.ETXTBSY: "EINVAL",
    errno.EMLINK: "EINVAL",
    errno.EIO: "EIO",
}

#: Largest frame either side accepts (write data is sent in frames of at most this size).
MAX_FRAME = 4 << 20
CHUNK = 1 << 20
#: A recursive listing, and the per-path lists of recursive copy/chmod/chown replies, stop
#: here and say `"truncated": true` (the reply stays a few MiB at most).
MAX_REPORTED = 100_000

CLONE_NEWUSER = 0x10000000
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: chown, dac_override, dac_read_search, fowner, fsetid: what in-sprite root needs for files.
ROOT_FILE_CAPS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4)

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class OpError(Exception):
    """An operation failure with its contract code, reported to the server as such."""

    def __init__(self, code: str, message: str, path: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path


def _os_error(exc: OSError, op: str, path: str) -> OpError:
    err = exc.errno or errno.EIO
    return OpError(ERRNO_CODES.get(err, "EIO"), f"{op} {path}: {os.strerror(err).lower()}",
                   path)


def _call(op: str, path: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one syscall wrapper, turning its OSError into a Go-style `op path: reason`."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise _os_error(exc, op, path) from None


# ---------------------------------------------------------------------------------- frames

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), CHUNK))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, size = struct.unpack(">cI", _recv_exact(sock, 5))
    if size > MAX_FRAME:
        raise EOFError("frame too large")
    return kind, _recv_exact(sock, size) if size else b""


def _send_frame(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(struct.pack(">cI", kind, len(payload)))
    if payload:
        sock.sendall(payload)


def _send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    _send_frame(sock, b"J", json.dumps(obj, separators=(",", ":")).encode())


def _send_error(sock: socket.socket, err: OpError) -> None:
    _send_json(sock, {"ok": False, "code": err.code, "error": err.message, "path": err.path})


def _refuse(sock: socket.socket, err: OpError) -> None:
    """Reply with an error before serving: read the request to its end first.

    Closing a Unix socket with unread bytes in its queue resets the peer, and the server's
    event loop drops a connection whose write failed before reading what had arrived, so
    an early error sent without the drain was often lost ("ended without a reply").
    """
    try:
        while _recv_frame(sock)[0] != b"E":
            pass
    except (OSError, EOFError, struct.error):
        return  # the server went away or sent garbage: nobody reads a reply
    _send_error(sock, err)


# --------------------------------------------------------------------------------- entries

def _rfc3339(ts: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, ValueError, OSError):  # a timestamp no calendar can show
        return "1970-01-01T00:00:00Z"


class _Report:
    """The per-path list of a recursive reply: `count` is exact, the list is cut at
    MAX_REPORTED entries."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.count = 0

    def add(self, item: dict[str, Any]) -> None:
        self.count += 1
        if len(self.items) < MAX_REPORTED:
            self.items.append(item)

    def reply(self, key: str, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {key: self.items, "count": self.count, **extra}
        if self.count > len(self.items):
            out["truncated"] = True
        return out


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _entry(name: str, path: str, st: os.stat_result) -> dict[str, Any]:
    if stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "file"
    return {"name": name, "path": path, "type": kind, "size": st.st_size, "mode": _mode(st),
            "modTime": _rfc3339(st.st_mtime), "isDir": kind == "directory"}


def _join(parent: str, name: str) -> str:
    return parent.rstrip("/") + "/" + name


def _is_dir(path: str, follow: bool) -> bool:
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode)


def _sorted_children(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _walk(top: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path relative to top, absolute path, lstat) of every descendant, depth-first
    pre-order, sorted by name (the order `find` prints).

    Never follows symlinks; unreadable subdirectories are listed but not entered (like
    `find`), entries that vanish while walking are skipped. Only an unreadable `top` raises.
    """
    stack: list[tuple[str, str, Iterator[os.DirEntry[str]]]] = [
        ("", top, iter(_sorted_children(top)))]
    while stack:
        rel_dir, abs_dir, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        try:
            st = child.stat(follow_symlinks=False)
        except OSError:
            continue
        rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
        absolute = _join(abs_dir, child.name)
        yield rel, absolute, st
        if stat.S_ISDIR(st.st_mode):
            try:
                stack.append((rel, absolute, iter(_sorted_children(absolute))))
            except OSError:
                pass


# ------------------------------------------------------------------------------ operations

def op_list(args: dict[str, Any], data: bytes, sock: socket.socket) -> dict[str, Any]:
    """A file (or symlink) lists as itself; a directory (or a symlink to one) as its children."""
    path: str = args["path"]
    recursive = bool(args.get("recursive"))
    pattern: str | None = args.get("pattern") or None
    st = _call("stat", path, os.lstat, path)
    listing_dir = stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and _is_dir(path, True))
    if not listing_dir:
        entry = _entry(posixpath.basename(path) or "/", path, st)
        return {"path": path, "entries": [entry], "count": 1}

    def wanted(rel: str, name: str) -> bool:
        if pattern is None:
            return True
        return fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern)

    entries: list[dict[str, Any]] = []
    truncated = False
    if recursive:
        walker = _walk(path)
        while True:
            try:
                rel, absolute, cst = next(walker)
            except StopIteration:
                break
            except OSError as exc:
                raise _os_error(exc, "readdir", path) from None
            if wanted(rel, posixpath.basename(rel)):
                if len(entries) >= MAX_REPORTED:
                    truncated = True
                    break
                entries.append(_entry(rel, absolute, cst))
    else:
        for child in _call("readdir", path, _sorted_children, path):
            try:
                cst = child.stat(follow_symlinks=False)
            except OSError:
                continue
            if wanted(child.name, child.name):
                entries.append(_entry(child.name, _join(path, child.name), cst))
    out: dict[str, Any] = {"path": path, "entries": entries, "count": len(entries)}
    if truncated:
        out["truncated"] = True
    return out


def _require_regular(op: str, path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise OpError("EISDIR", f"{op} {path}: is a directory", path)
    if not stat.S_ISREG(mode):
        raise OpError("EINVAL", f"{op} {path}: not a regular file", path)


def _open_regular(op: str, path: str, flags: int, mode: int = 0o644) -> int:
    """Open a regular file, refusing directories (EISDIR) and special files (EINVAL)
    without side effects: the type is checked before the open (no device or FIFO is ever
    opened) and again on the descriptor (the path may have changed in between)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise OpError("ENOENT", f"{op} {path}: no such file or directory", path) from None
    except OSError as exc:
        raise _os_error(exc, op, path) from None
    else:
        _require_regular(op, path, st.st_mode)
    fd: int = _call(op, path, os.open, path,
                    flags | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode):
        os.close(fd)
        _require_regular(op, path, fst.st_mode)
    os.set_blocking(fd, True)
    return fd


def op_read(args: dict[str, Any], data: bytes, sock: socket.socket) -> None:
    path: str = args["path"]
    fd = _open_regular("open", path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        # a part of the file (a service log's tail): from `offset` (from the end when
        # negative), at most `limit` bytes
        offset = int(args.get("offset") or 0)
        left = int(args["limit"]) if args.get("limit") is not None else -1
        start = max(0, size + offset) if offset < 0 else offset
        if start:
            os.lseek(fd, start, os.SEEK_SET)
        _send_json(sock, {"ok": True, "stream": True,
                          "result": {"path": path, "size": size, "start": start}})
        while left != 0:
            try:
                chunk = os.read(fd, CHUNK if left < 0 else min(CHUNK, left))
            except OSError as exc:
                _send_error(sock, _os_error(exc, "read", path))
                return None
            if not chunk:
                break
            if left > 0:
                left -= len(chunk)
            _send_frame(sock, b"D", chunk)
        _send_frame(sock, b"E")
    finally:
        os.close(fd)
    return None


def _mkdir_parents(path: str) -> None:
    """`mkdir -p`: a component that exists but is not a directory is ENOTDIR."""
    current = ""
    for part in [p for p in path.split("/") if p]:
        current += "/" + part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if not _is_dir(current, True):
                raise OpError("ENOTDIR", f"mkdir {current}: not a directory", current) from None
        except OSError as exc:
            raise _os_error(exc, "mkdir", current) from None


def op_write(args: dict[str, Any], data: bytes, sock: socket.socket) -> dict[str, Any]:
    """Create or truncate+overwrite. Parents: all of them with mkdirParents, else only the
    immediate one when its own parent exists (what every SDK's mkdir emulation needs)."""
    path: str = args["path"]
    mode: int | None = args.get("mode")
    if path == "/":
        raise OpError("EISDIR", "open /: is a directory", path)
    parent = posixpath.dirname(path)
    if args.get("mkdirParents"):
        _mkdir_parents(parent)
    elif not os.path.lexists(parent):
        _call("mkdir", parent, os.mkdir, parent, 0o755)
    fd = _open_regular("open", path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                       0o644 if mode is None else mode)
    try:
        if mode is not None and stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            try:
                os.fchmod(fd, mode)
            except PermissionError:
                pass  # writable but not ours: the owner's mode stays, like `cat > file`
        view = memoryview(data)
        while view:
            written = _call("write", path, os.write, fd, view[:CHUNK])
            view = view[written:]
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return {"path": path, "size": st.st_size, "mode": _mode(st)}


def _remove_tree(top: str) -> None:
    """rm -r without recursion limits and without following symlinks."""
    stack = [(top, False)]
    while stack:
        path, expanded = stack.pop()
        if expanded:
            _call("remove", path, os.rmdir, path)
            continue
        stack.append((path, True))
        for child in _call("readdir", path, _sorted_children, path):
            cpath = _join(path, child.name)
            if child.is_dir(follow_symlinks=False):
                stack.append((cpath, False))
            else:
                _call("remove", cpath, os.unlink, cpath)


def op_delete(args: dict[str, Any], data: bytes, sock: socket.socket) -> dict[str, Any]:
    path: str = args["path"]
    if path == "/":
        raise OpError("EPERM", "remove /: refusing to delete the root directory", path)
    st = _call("remove", path, os.lstat, path)
    if stat.S_ISDIR(st.st_mode):
        if args.get("recursive"):
            _remove_tree(path)
        else:
            _call("remove", path, os.rmdir, path)
    else:
        _call("remove", path, os.unlink, path)
    return {"deleted": [path], "count": 1}


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def op_rename(args: dict[str, Any], data: bytes, sock: socket.socket) -> dict[str, Any]:
    """rename(2); a directory that overlayfs cannot rename (EXDEV: it lives in the lower
    layer) is copied with its attributes and then removed, as `mv` does."""
    source: str = args["source"]
    dest: str = args["dest"]
    if source == "/" or dest == "/":
        raise OpError("EINVAL", f"rename {source} {dest}: invalid argument", source)
    st = _call("rename", source, os.lstat, source)
    if stat.S_ISDIR(st.st_mode) and _inside(dest, source) and dest != source:
        raise OpError("EINVAL", f"rename {source} {dest}: destination is inside the source",
                      dest)
    try:
        os.rename(source, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise _os_error(exc, "rename", dest if exc.errno == errno.ENOENT else source) \
                from None
        _copy_any(source, dest, st, preserve=True, copied=_Report())
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(source)
        else:
            _call("remove", source, os.unlink, source)
    return {"source": source, "dest": dest}


def _copy_data(src_fd: int, dst_fd: int, path: str) -> None:
    try:
        while os.copy_file_range(src_fd, dst_fd, CHUNK * 8):
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise _os_error(exc, "copy", path) from None
    while True:
        chunk = _call("read", path, os.read, src_fd, CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[_call("write", path, os.write, dst_fd, view):]


def _apply_attrs(dst: str, st: os.stat_result, fd: int | None = None) -> None:
    """Owner (when allowed: only the sprite's root may give files away), mode, times."""
    try:
        if fd is not None:
            os.fchown(fd, st.st_uid, st.st_gid)
        else:
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    except OSError:
        pass
    times = (st.st_atime_ns, st.st_mtime_ns)
    if stat.S_ISLNK(st.st_mode):
        try:
            os.utime(dst, ns=times, follow_symlinks=False)
        except OSError:
            pass
        return
    target: int | str = dst if fd is None else fd
    _call("chmod", dst, os.chmod, target, stat.S_IMODE(st.st_mode))
    _call("utime", dst, os.utime, target, ns=times)


def _same_file(a: os.stat_result, path: str) -> bool:
    try:
        b = os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _copy_file(src: str, dst: str, st: os.stat_result, preserve: bool) -> int:
    src_fd = _open_regular("open", src, os.O_RDONLY)
    try:
        if _same_file(os.fstat(src_fd), dst):  # b -> a: truncating b would empty a
            raise OpError("EINVAL", f"copy {src} {dst}: source and destination are the "
                          "same file", dst)
        dst_fd = _open_regular("open", dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                               stat.S_IMODE(st.st_mode) & 0o777)
        try:
            _copy_data(src_fd, dst_fd, dst)
            if preserve:
                _apply_attrs(dst, os.fstat(src_fd), dst_fd)
            return os.fstat(dst_fd).st_size
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _copy_link(src: str, dst: str, st: os.stat_result, preserve: bool) -> None:
    target = _call("readlink", src, os.readlink, src)
    if os.path.lexists(dst):
        if _is_dir(dst, False):
            raise OpError("EISDIR", f"copy {dst}: is a directory", dst)
        _call("remove", dst, os.unlink, dst)
    _call("symlink", dst, os.symlink, target, dst)
    if preserve:
        _apply_attrs(dst, st)


def _copy_any(source: str, dest: str, st: os.stat_result, preserve: bool,
              copied: _Report) -> int:
    """Copy the file, symlink or whole tree `source` (whose stat is `st`) to exactly `dest`;
    returns the bytes copied. Symlinks inside a tree are copied as symlinks; FIFOs, sockets
    and devices inside a tree are skipped.
    """
    if stat.S_ISLNK(st.st_mode):
        _copy_link(source, dest, st, preserve)
        copied.add({"source": source, "dest": dest})
        return 0
    if not stat.S_ISDIR(st.st_mode):
        if _is_dir(dest, True):
            raise OpError("EISDIR", f"copy {dest}: is a directory", dest)
        total = _copy_file(source, dest, st, preserve)
        copied.add({"source": source, "dest": dest})
        return total

    total = 0
    dirs: list[tuple[str, str, os.stat_result]] = []

    def make_dir(src_dir: str, dst_dir: str, dst_st: os.stat_result) -> None:
        try:
            os.mkdir(dst_dir, stat.S_IMODE(dst_st.st_mode) & 0o777 | 0o700)
        except FileExistsError:
            if not _is_dir(dst_dir, True):
                raise OpError("ENOTDIR", f"copy {dst_dir}: not a directory", dst_dir) from None
        except OSError as exc:
            raise _os_error(exc, "mkdir", dst_dir) from None
        dirs.append((src_dir, dst_dir, dst_st))
        copied.add({"source": src_dir, "dest": dst_dir})

    make_dir(source, dest, st)
    walker = _walk(source)
    while True:
        try:
            rel, src_path, cst = next(walker)
        except StopIteration:
            break
        except OSError as exc:
            raise _os_error(exc, "readdir", source) from None
        dst_path = _join(dest, rel)
        if stat.S_ISDIR(cst.st_mode):
            make_dir(src_path, dst_path, cst)
        elif stat.S_ISLNK(cst.st_mode):
            _copy_link(src_path, dst_path, cst, preserve)
            copied.add({"source": src_path, "dest": dst_path})
        elif stat.S_ISREG(cst.st_mode):
            total += _copy_file(src_path, dst_path, cst, preserve)
            copied.add({"source": src_path, "dest": dst_path})
    for _src_dir, dst_dir, dst_st in reversed(dirs):  # deepest first: times stick
        if preserve:
            _apply_attrs(dst_dir, dst_st)
        else:
            _call("chmod", dst_dir, os.chmod, dst_dir, stat.S_IMODE(dst_st.st_mode) & 0o777)
    return total


def op_copy(args: dict[str, Any], data: bytes, sock: socket.socket) -> dict[str, Any]:
    """The source is followed when it is a symlink (like `cp`): a dangling one is ENOENT."""
    source: str = args["source"]
    dest: str = args["dest"]
    st = _call("copy", source, os.stat, source)
    if stat.S_ISDIR(st.st_mode):
        if not args.get("recursive"):
            raise OpError("EISDIR", f"copy {source}: is a directory (not copied without "
                          "recursive)", source)
        if _inside(dest, source):
            raise OpError("EINVAL", f"copy {source} {dest}: cannot copy a directory into "
                          "itself", dest)
    elif dest == source:
        raise OpError("EINVAL", f"copy {source} {dest}: source and destination are the same",
                      dest)
    copied = _Report()
    total = _copy_any(source, dest, st, bool(args.get("preserveAttrs")), copied)
    return copied.reply("copied", totalBytes=total)


def op_chmod(args: dict[str, Any], data: bytes, sock: socket.socket) -> dict[str, Any]:
    """Like `chmod -R`: the top path is followed if it is a symlink, symlinks inside a tree
    are left alone (Linux has no mode on symlinks)."""
    path: str = args["path"]
    mode: int = args["mode"]
    text = f"{mode:04o}"
    _call("chmod", path, os.chmod, path, mode)
    affected = _Report()
    affected.add({"path": path, "mode": text})
    if args.get("recursive") and _is_dir(path, True):
        walker = _walk(path)
        while True:
            try:
                _rel, child, cst = next(walker)
            except StopIteration:
                break
            except OSError as exc:
                raise _os_error(exc, "readdir", path) from None
            if stat.S_ISLNK(cst.st_mode):
                continue
            _call("chmod", child, os.chmod, child, mode)
            affected.add({"path": child, "mode": text})
    return affected.reply("affected")


def _lookup_id(value: Any, table: str, what: str, path: str) -> int:
    """A number, or a name from the sprite's own /etc/passwd or /etc/group (read here,
    inside the chroot; never through NSS, which could load the sprite's libraries)."""
    if value is None:
        return -1
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        with open(table, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 3 and fields[0] == text and fields[2].isdigit():
                    return int(fields[2])
    except OSError:
        pass
    raise OpError("EINVAL", f"chown {path}: unknown {what} {text!r}", path)


def op_chown(args: dict[str, Any], data: bytes, sock: socket.socket) -> dict[str, Any]:
    path: str = args["path"]
    uid = _lookup_id(args.get("uid"), "/etc/passwd", "user", path)
    gid = _lookup_id(args.get("gid"), "/etc/group", "group", path)
    _call("chown", path, os.chown, path, uid, gid)
    st = os.stat(path)
    affected = _Report()
    affected.add({"path": path, "uid": st.st_uid, "gid": st.st_gid})
    if args.get("recursive") and stat.S_ISDIR(st.st_mode):
        walker = _walk(path)
        while True:
            try:
                _rel, child, _cst = next(walker)
            except StopIteration:
                break
            except OSError as exc:
                raise _os_error(exc, "readdir", path) from None
            _call("chown", child, os.lchown, child, uid, gid)
            cst = os.lstat(child)
            affected.add({"path": child, "uid": cst.st_uid, "gid": cst.st_gid})
    return affected.reply("affected")


def op_identity(args: dict[str, Any], data: bytes, sock: socket.socket) -> dict[str, Any]:
    """What the worker runs as (diagnostics, and the proof the security tests check)."""
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    caps = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), caps), "capget")
    bounding = 0
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_READ, ctypes.c_ulong(cap), 0, 0, 0) == 1:
            bounding |= 1 << cap
    return {
        "uid": list(os.getresuid()), "gid": list(os.getresgid()), "groups": os.getgroups(),
        "capEffective": caps[0].effective | caps[1].effective << 32,
        "capPermitted": caps[0].permitted | caps[1].permitted << 32,
        "capInheritable": caps[0].inheritable | caps[1].inheritable << 32,
        "capBounding": bounding,
        "noNewPrivs": _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1,
        "importers": [getattr(f, "__name__", type(f).__name__) for f in sys.meta_path],
        "root": sorted(os.listdir("/")),
    }


OPS: dict[str, Callable[[dict[str, Any], bytes, socket.socket], dict[str, Any] | None]] = {
    "list": op_list,
    "read": op_read,
    "write": op_write,
    "delete": op_delete,
    "rename": op_rename,
    "copy": op_copy,
    "chmod": op_chmod,
    "chown": op_chown,
    "identity": op_identity,
}


# ------------------------------------------------------------------------- confinement

def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _drop_bounding(keep: int, cap_last: int) -> None:
    """Shrink the bounding set (needs CAP_SETPCAP, so it runs while the worker still has it)."""
    for cap in range(cap_last + 1):
        if not keep & (1 << cap):
            _check(_libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0), "capbset_drop")


def _set_caps(keep: int) -> None:
    """Effective and permitted sets down to `keep`; nothing inheritable."""
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = keep & 0xFFFFFFFF
    data[1].effective = data[1].permitted = keep >> 32
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _seal_imports() -> None:
    """After the chroot a lazy import would search the sprite's files for Python code:
    allow only built-in and frozen modules."""
    keep = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)
    sys.meta_path[:] = [f for f in sys.meta_path if f in keep]
    sys.path[:] = []
    sys.path_hooks[:] = []
    sys.path_importer_cache.clear()


def _confine(setup: dict[str, Any], root_fd: int, cap_last: int) -> None:
    """Runs in the worker after its uid/gid maps are written (see the module docstring)."""
    os.fchdir(root_fd)
    os.chroot(".")
    os.chdir("/")
    os.close(root_fd)
    os.setgroups([int(g) for g in setup["groups"]])
    os.setresgid(setup["gid"], setup["gid"], setup["gid"])
    os.setresuid(0, 0, 0)
    keep = ROOT_FILE_CAPS if setup["uid"] == 0 else 0
    _drop_bounding(keep, cap_last)
    # root -> non-root clears the permitted set by itself; _set_caps makes it explicit
    os.setresuid(setup["uid"], setup["uid"], setup["uid"])
    _set_caps(keep)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0), "no_new_privs")
    os.umask(0)
    _seal_imports()


def _serve(conn: socket.socket) -> None:
    kind, payload = _recv_frame(conn)
    if kind != b"J":
        return
    request = json.loads(payload)
    data = bytearray()
    while True:
        kind, payload = _recv_frame(conn)
        if kind == b"E":
            break
        data += payload
    op = OPS.get(request.get("op"))
    try:
        if op is None:
            raise OpError("EINVAL", f"unknown operation {request.get('op')!r}", None)
        result = op(request.get("args") or {}, bytes(data), conn)
        if result is not None:
            _send_json(conn, {"ok": True, "stream": False, "result": result})
    except OpError as err:
        _send_error(conn, err)
    except OSError as exc:
        _send_error(conn, _os_error(exc, request.get("op", "?"),
                                    str((request.get("args") or {}).get("path", ""))))
    except (ValueError, KeyError, TypeError) as exc:
        _send_error(conn, OpError("EINVAL", f"{request.get('op')}: {exc}", None))


def _user_namespace(base: int, count: int) -> int:
    """A user namespace mapping ids 0..count-1 onto host ids base.., held by an fd.

    Made once per range: a child unshares, the zygote (host root, CAP_SETUID in the initial
    namespace) writes its maps and opens its ns file, then lets it exit; the fd keeps the
    namespace alive. Workers then only `setns` into it.
    """
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(done_w)
        os.write(ready_w, b"1" if _libc.unshare(CLONE_NEWUSER) == 0 else b"0")
        os.read(done_r, 1)  # returns (EOF) once the zygote holds the namespace
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "cannot create a user namespace")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {base} {count}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)


def _worker(setup: dict[str, Any], conn: socket.socket, userns: int, cap_last: int) -> int:
    """Runs as host root until `setns`: opens the sprite's root by its host path (trusted,
    from the server), then enters the sprite's user namespace and confines itself."""
    rootfs = setup["rootfs"]
    try:
        root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if setup.get("require_mount"):
            parent = os.stat("..", dir_fd=root_fd)
            if os.fstat(root_fd).st_dev == parent.st_dev:
                raise OSError(errno.EIO, "the sprite's root filesystem is not mounted")
    except OSError as exc:
        # never the host path of the root: the reply goes to the client
        _refuse(conn, OpError("EIO", f"the sprite's root filesystem: {exc.strerror}", None))
        return 1
    try:
        _check(_libc.setns(userns, CLONE_NEWUSER), "setns")
        os.close(userns)
        _confine(setup, root_fd, cap_last)
    except OSError as exc:
        _refuse(conn, OpError("EIO", f"entering the sprite: {exc}", None))
        return 1
    _serve(conn)
    return 0


def main(argv: list[str]) -> int:
    """The zygote loop: one control message per operation, until the server goes away."""
    ctl = socket.socket(fileno=int(argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            cap_last = int(f.read())
    except (OSError, ValueError):
        cap_last = 63
    namespaces: dict[tuple[int, int], int] = {}
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 16, 1)
        except InterruptedError:
            continue
        if not msg:
            return 0
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        conn = socket.socket(fileno=fds[0])
        try:
            setup = json.loads(msg)
            ids = (int(setup["uid_base"]), int(setup["id_range"]))
            if ids not in namespaces:
                namespaces[ids] = _user_namespace(*ids)
            pid = os.fork()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            try:
                _send_error(conn, OpError("EIO", f"fs agent: {exc}", None))
            except OSError:
                pass
            conn.close()
            continue
        if pid == 0:
            code = 1
            try:
                ctl.close()
                for other, fd in namespaces.items():
                    if other != ids:
                        os.close(fd)
                code = _worker(setup, conn, namespaces[ids], cap_last)
            except BaseException as exc:  # never let a worker unwind into the zygote loop
                try:
                    _send_error(conn, OpError("EIO", f"internal error: {exc!r}", None))
                except OSError:
                    pass
            finally:
                os._exit(code)
        conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
