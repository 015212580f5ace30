"""File operations inside a sprite (contract §4), run by the confined fs agent.

The server never touches a sprite's files itself. Each call sends one request to a fork
server (`wisp/fs_agent.py`, started once per `Filesystem`, host root, never chrooted) which
forks a worker that enters the sprite's root as the sprite's user or, for `as_root`, as the
sprite's root, and only then resolves the path. See `wisp.fs_agent` for the confinement and
the wire protocol.

Paths given here are already absolute and clean (`resolve_path`); errors come back as
`FsError` with the contract's errno codes.

`Filesystem` is loop-agnostic: the agent is a plain `subprocess.Popen` child, and each call
opens its own socket pair in the calling loop, so one instance may serve several event loops
(tests start and stop servers freely). Closing it (or the server dying) ends the agent.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from wisp.errors import FsError
from wisp.runtime.base import ID_RANGE, SpriteHandle

__all__ = ["Filesystem", "FileStream", "resolve_path", "MAX_WRITE_BYTES", "AGENT_PATH"]

#: Largest body `PUT /fs/write` accepts (OpenAPI: 16 MiB, else 413).
MAX_WRITE_BYTES = 16 << 20
AGENT_PATH = Path(__file__).with_name("fs_agent.py")
_FRAME_DATA = 1 << 20
#: Replies are at most ~100k entries of JSON (the agent cuts longer lists).
_MAX_FRAME = 64 << 20
#: A single operation (a big recursive copy, say) may take this long before we give up on it.
OP_TIMEOUT = 600.0
#: While streaming a file, each chunk must arrive within this.
CHUNK_TIMEOUT = 60.0


def resolve_path(path: str | None, working_dir: str | None, default_dir: str,
                 field: str = "path") -> str:
    """Contract §4.1: `path` if absolute, else `clean(workingDir + "/" + path)`.

    Cleaning is lexical (Go's `path.Clean`): `..` never climbs above `/`. This is about the
    reply's `path` field, not about safety: the agent resolves the result inside the sprite's
    chroot, where `/..` is `/` anyway.
    """
    if path is None:
        raise FsError("EINVAL", f"missing required parameter {field!r}")
    wd = working_dir or default_dir
    if "\x00" in path or "\x00" in wd:
        raise FsError("EINVAL", f"{field} contains a NUL byte", path.replace("\x00", ""))
    if not wd.startswith("/"):
        wd = "/" + wd
    joined = path if path.startswith("/") else f"{wd}/{path or '.'}"
    cleaned = posixpath.normpath(joined)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


class FileStream:
    """The bytes of a file being read; iterate once, or `aclose()` to abandon it."""

    def __init__(self, path: str, size: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.path = path
        self.size = size
        self._reader = reader
        self._writer = writer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while True:
                kind, payload = await asyncio.wait_for(_read_frame(self._reader),
                                                       CHUNK_TIMEOUT)
                if kind == b"D":
                    yield payload
                elif kind == b"E":
                    return
                else:  # an error after the header: the HTTP response can only be cut short
                    reply = json.loads(payload)
                    raise _fs_error(reply)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


class Filesystem:
    """Runs file operations in sprites through one confined fork server.

    `require_mount` refuses to work on a sprite root that is not a mount point (a stopped
    sprite's empty mount directory must never receive files); tests on a plain directory
    tree turn it off.
    """

    def __init__(self, *, require_mount: bool = True, python: str = sys.executable) -> None:
        self.require_mount = require_mount
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._lock = threading.Lock()

    # -- agent lifecycle ----------------------------------------------------------------

    def _ensure_agent(self) -> socket.socket:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None and self._ctl is not None:
                return self._ctl
            self._stop_locked()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._proc = subprocess.Popen(
                    [self._python, "-I", "-S", str(AGENT_PATH), str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                ours.close()
                raise FsError("EIO", f"cannot start the fs agent: {exc}") from None
            finally:
                theirs.close()
            ours.setblocking(False)
            self._ctl = ours
            return ours

    def _stop_locked(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None

    def close(self) -> None:
        """End the agent (it also ends by itself when this process exits)."""
        with self._lock:
            self._stop_locked()

    @property
    def agent_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    async def _send_setup(self, setup: bytes, fd: int) -> None:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            ctl = self._ensure_agent()
            try:
                while True:
                    try:
                        socket.send_fds(ctl, [setup], [fd])
                        return
                    except BlockingIOError:
                        ready: asyncio.Future[None] = loop.create_future()

                        def writable(ready: asyncio.Future[None] = ready) -> None:
                            if not ready.done():
                                ready.set_result(None)

                        loop.add_writer(ctl.fileno(), writable)
                        try:
                            await asyncio.wait_for(ready, 10)
                        finally:
                            loop.remove_writer(ctl.fileno())
            except (TimeoutError, OSError) as exc:
                with self._lock:  # agent died or hung: start a fresh one and retry once
                    if self._proc is not None:
                        self._proc.kill()
                    self._stop_locked()
                if attempt == 2:
                    raise FsError("EIO", f"fs agent unavailable: {exc}") from None

    async def _open(self, handle: SpriteHandle, as_root: bool, op: str,
                    args: dict[str, Any], data: bytes = b""
                    ) -> tuple[dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter]:
        setup = {
            "rootfs": str(handle.rootfs),
            "uid_base": handle.uid_base,
            "id_range": ID_RANGE,
            "uid": 0 if as_root else handle.user_uid,
            "gid": 0 if as_root else handle.user_gid,
            "groups": [0] if as_root else list(handle.groups),
            "require_mount": self.require_mount,
        }
        if handle.fs_connect is not None:  # the sprite's own fs agent (a VM's guest)
            try:
                reader, writer = await handle.fs_connect(json.dumps(setup).encode())
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                raise FsError("EIO", f"the sprite's fs agent cannot be reached: {exc}"
                              ) from None
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await self._send_setup(json.dumps(setup).encode(), theirs.fileno())
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            _write_frame(writer, b"J", json.dumps({"op": op, "args": args}).encode())
            for start in range(0, len(data), _FRAME_DATA):
                _write_frame(writer, b"D", data[start:start + _FRAME_DATA])
                await writer.drain()
            _write_frame(writer, b"E")
            await writer.drain()
        except OSError:
            pass  # the worker failed before reading everything; its reply says why
        try:
            kind, payload = await asyncio.wait_for(_read_frame(reader), OP_TIMEOUT)
            reply = json.loads(payload) if kind == b"J" else None
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            reply = None
        except TimeoutError:
            writer.close()
            raise FsError("EIO", f"{op} {args.get('path') or args.get('source')}: timed out",
                          args.get("path") or args.get("source")) from None
        except BaseException:
            writer.close()
            raise
        if reply is None:
            writer.close()
            raise FsError("EIO", f"{op}: the fs agent ended without a reply")
        if not reply.get("ok"):
            writer.close()
            raise _fs_error(reply)
        return reply, reader, writer

    async def _call(self, handle: SpriteHandle, as_root: bool, op: str,
                    args: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
        reply, _reader, writer = await self._open(handle, as_root, op, args, data)
        writer.close()
        result: dict[str, Any] = reply.get("result") or {}
        return result

    # -- operations (contract §4.2-4.9) -------------------------------------------------

    async def list(self, handle: SpriteHandle, path: str, *, recursive: bool = False,
                   pattern: str | None = None, as_root: bool = False) -> dict[str, Any]:
        """`{"path", "entries", "count"}`: a file as itself, a directory as its children
        (with `recursive`, all descendants named relative to `path`), filtered by the glob
        `pattern` (matched against the name, or the relative path when it has a `/`)."""
        return await self._call(handle, as_root, "list",
                                {"path": path, "recursive": recursive, "pattern": pattern})

    async def read(self, handle: SpriteHandle, path: str, *, as_root: bool = False,
                   offset: int = 0, limit: int | None = None) -> FileStream:
        """Open a regular file for streaming; errors (ENOENT, EISDIR, EACCES) raise here,
        before any byte is sent. `offset` (from the end when negative) and `limit` read a
        part of it; `size` is the whole file's."""
        args: dict[str, Any] = {"path": path}
        if offset or limit is not None:
            args.update(offset=offset, limit=limit)
        reply, reader, writer = await self._open(handle, as_root, "read", args)
        result = reply.get("result") or {}
        return FileStream(path, int(result.get("size", 0)), reader, writer)

    async def write(self, handle: SpriteHandle, path: str, data: bytes, *,
                    mode: int | None = None, mkdir_parents: bool = False,
                    as_root: bool = False) -> dict[str, Any]:
        """`{"path", "size", "mode"}`. `mode` None keeps an existing file's mode (0644 for
        a new one); parents per contract §4.4."""
        if len(data) > MAX_WRITE_BYTES:
            raise FsError("EINVAL", f"write {path}: larger than {MAX_WRITE_BYTES} bytes", path)
        return await self._call(handle, as_root, "write",
                                {"path": path, "mode": mode, "mkdirParents": mkdir_parents},
                                data)

    async def delete(self, handle: SpriteHandle, path: str, *, recursive: bool = False,
                     as_root: bool = False) -> dict[str, Any]:
        """`{"deleted": [path], "count": 1}`; `/` is refused (EPERM)."""
        return await self._call(handle, as_root, "delete",
                                {"path": path, "recursive": recursive})

    async def rename(self, handle: SpriteHandle, source: str, dest: str, *,
                     as_root: bool = False) -> dict[str, Any]:
        return await self._call(handle, as_root, "rename", {"source": source, "dest": dest})

    async def copy(self, handle: SpriteHandle, source: str, dest: str, *,
                   recursive: bool = False, preserve_attrs: bool = False,
                   as_root: bool = False) -> dict[str, Any]:
        """`{"copied": [{"source", "dest"}...], "count", "totalBytes"}`; `dest` is the exact
        target path (a directory is merged into an existing one)."""
        return await self._call(handle, as_root, "copy",
                                {"source": source, "dest": dest, "recursive": recursive,
                                 "preserveAttrs": preserve_attrs})

    async def chmod(self, handle: SpriteHandle, path: str, mode: int, *,
                    recursive: bool = False, as_root: bool = False) -> dict[str, Any]:
        return await self._call(handle, as_root, "chmod",
                                {"path": path, "mode": mode, "recursive": recursive})

    async def chown(self, handle: SpriteHandle, path: str, *, uid: int | str | None = None,
                    gid: int | str | None = None, recursive: bool = False,
                    as_root: bool = False) -> dict[str, Any]:
        """Ids are the sprite's own (0-65535); names come from the sprite's /etc/passwd and
        /etc/group. Only `as_root` may give a file to another user."""
        if uid is None and gid is None:
            raise FsError("EINVAL", f"chown {path}: uid or gid is required", path)
        return await self._call(handle, as_root, "chown",
                                {"path": path, "uid": uid, "gid": gid, "recursive": recursive})

    async def identity(self, handle: SpriteHandle, *, as_root: bool = False) -> dict[str, Any]:
        """What a worker for this sprite runs as: in-sprite ids, capability sets (bit masks),
        no_new_privs, the import machinery left, and the names in its `/` (diagnostics)."""
        return await self._call(handle, as_root, "identity", {})


def _fs_error(reply: dict[str, Any]) -> FsError:
    return FsError(str(reply.get("code") or "EIO"), str(reply.get("error") or "fs error"),
                   reply.get("path"))


def _write_frame(writer: asyncio.StreamWriter, kind: bytes, payload: bytes = b"") -> None:
    writer.write(struct.pack(">cI", kind, len(payload)))
    if payload:
        writer.write(payload)


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, size = struct.unpack(">cI", await reader.readexactly(5))
    if size > _MAX_FRAME:
        raise ValueError("fs agent frame too large")
    return kind, (await reader.readexactly(size)) if size else b""
