"""Services (contract §2.11, §5.2): long-running processes a sprite keeps running.

Who does what (docs/services.md):

* Definitions are a file on the sprite's disk, `/.sprite/services.json` (the info dir,
  written only by the host, read-only inside), so a checkpoint holds them, a restore rewinds
  them and a fork copies them. An explicit stop is part of the definition (`stopped`), so
  a stopped service stays stopped across boots.
* Supervision is wisp-init's (`wisp/runtime/supervisor.py`): it forks each service like an
  exec'd command, restarts it with backoff when it exits or is killed, writes its logs to
  `/.sprite/logs/services/`, and keeps doing so whatever the server does.
* This module validates requests, keeps the file, tells the agent, and turns the agent's
  status and the log files into the contract's JSON and NDJSON events. `boot` is the one
  call `Sprites._start` makes: every definition is handed to the agent in `needs` order.

Every call that needs the agent wakes the sprite. Changes to definitions hold the sprite's
lock; following output (the `duration` window) does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wisp.errors import (
    BadRequest,
    Conflict,
    FsError,
    ServiceNotFound,
    ServiceNotRunning,
    SpriteUnresponsive,
    SystemError_,
    WispError,
)
from wisp.filesystem import Filesystem
from wisp.runtime import supervisor
from wisp.runtime.base import SpriteHandle

if TYPE_CHECKING:
    from wisp.db import SpriteRow
    from wisp.sprites import Sprites

__all__ = ["SpriteServices", "ServiceDef", "boot", "http_port", "load", "save", "needs_order",
           "NAME_RE", "FILE", "LOG_MAX", "MAX_SERVICES", "Logs"]

log = logging.getLogger("wisp.services")

#: The definitions, relative to the sprite's info dir (`/.sprite` inside).
FILE = "services.json"
#: Service names: safe as a file name and in the agent's protocol (wisp-init.c).
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_ -]{0,62}")
MAX_SERVICES = 64
#: Each log file is rotated to FILE.1 past this size, so a service's logs hold at most 6x.
LOG_MAX = 1 << 20
DEFAULT_DURATION = 5.0
DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_LOG_LINES = 100
#: How often a follow polls the agent's status and the log files.
POLL = 0.05
#: Raw bytes per `stdout`/`stderr` event: escaped as JSON, a line stays under 64 KiB.
CHUNK = 8192
_HOST_HTTP_PORT_MSG = "another service already has an HTTP port configured"


def _ms() -> int:
    return int(time.time() * 1000)


def _rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log_files(name: str) -> dict[str, str]:
    base = f"{supervisor.LOG_DIR}/{name}"
    return {"combined": f"{base}.log", "stdout": f"{base}.stdout.log",
            "stderr": f"{base}.stderr.log"}


@dataclass
class ServiceDef:
    """One service's definition, as stored; `stopped`: explicitly stopped (stays so)."""

    name: str
    cmd: str
    args: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    http_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    dir: str | None = None
    stopped: bool = False

    @staticmethod
    def parse(name: str, body: object) -> ServiceDef:
        """A definition from a PUT body (contract §5.2); `BadRequest` on anything off."""
        check_name(name)
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        cmd = body.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            raise BadRequest("cmd is required: the program to run")
        args = _strings(body.get("args"), "args")
        needs = _strings(body.get("needs"), "needs")
        for need in needs:
            if not NAME_RE.fullmatch(need):
                raise BadRequest(f"needs: invalid service name {need!r}")
            if need == name:
                raise BadRequest("a service cannot need itself")
        port = body.get("http_port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 1 <= port <= 65535):
            raise BadRequest("http_port must be an integer between 1 and 65535")
        env = body.get("env")
        if env is None:
            env = {}
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise BadRequest("env must be an object of strings")
        for k in env:
            if not k or "=" in k or "\0" in k:
                raise BadRequest(f"invalid environment variable name {k!r}")
        dir_ = body.get("dir")
        if dir_ is not None and not isinstance(dir_, str):
            raise BadRequest("dir must be a string")
        for text in (cmd, *args, *env.values(), dir_ or ""):
            if "\0" in text:
                raise BadRequest("cmd, args, env and dir must not contain NUL bytes")
        return ServiceDef(name, cmd, args, needs, port, dict(env), dir_ or None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "cmd": self.cmd, "args": list(self.args),
                               "needs": list(self.needs), "http_port": self.http_port,
                               "env": dict(self.env)}
        if self.dir:
            out["dir"] = self.dir
        return out

    def stored(self) -> dict[str, Any]:
        return {**self.to_json(), "stopped": self.stopped}


def _strings(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BadRequest(f"{what} must be an array of strings")
    return list(value)


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise BadRequest(f"invalid service name {name!r}: use 1-63 letters, digits, '_', '-' "
                         "or spaces, not starting with a space")
    return name


# -- the definitions file ----------------------------------------------------------------
def load(info_dir: Path) -> dict[str, ServiceDef]:
    """The definitions stored on the sprite's disk (none stored: none)."""
    try:
        raw = json.loads((info_dir / FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", info_dir / FILE, exc)
        return {}
    out: dict[str, ServiceDef] = {}
    for item in raw.get("services", []) if isinstance(raw, dict) else []:
        try:
            d = ServiceDef.parse(str(item.get("name")), item)
        except (BadRequest, AttributeError):
            continue
        d.stopped = bool(item.get("stopped"))
        out[d.name] = d
    return out


def save(info_dir: Path, defs: dict[str, ServiceDef]) -> None:
    """Replace the file atomically (the info dir is the host's: nothing inside can race)."""
    info_dir.mkdir(mode=0o755, exist_ok=True)
    tmp = info_dir / (FILE + ".tmp")
    body = {"version": 1, "services": [d.stored() for d in sorted(defs.values(),
                                                                  key=lambda d: d.name)]}
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, info_dir / FILE)
    _http_ports.pop(info_dir / FILE, None)


def needs_order(defs: dict[str, ServiceDef]) -> list[ServiceDef]:
    """Every definition, each after the ones it needs (by name otherwise; a need that is
    not defined is ignored, a cycle is broken at the name first in order)."""
    done: set[str] = set()
    out: list[ServiceDef] = []

    def visit(name: str, path: set[str]) -> None:
        if name in done or name in path or name not in defs:
            return
        path.add(name)
        for need in sorted(defs[name].needs):
            visit(need, path)
        path.discard(name)
        done.add(name)
        out.append(defs[name])

    for name in sorted(defs):
        visit(name, set())
    return out


# -- talking to the agent ------------------------------------------------------------------
def _request(handle: SpriteHandle, d: ServiceDef, *, start: bool) -> list[bytes]:
    """What the agent is sent for `d`: it runs as exec'd commands do (the sprite user, the
    exec environment with the service's `env` on top, `dir` or the home directory)."""
    from wisp.exec.sessions import default_env

    env = {**default_env(handle), **d.env}
    return supervisor.define_request(d.name, [d.cmd, *d.args], env, d.dir or handle.home,
                                     handle.user_uid, handle.user_gid, handle.groups,
                                     start=start, log_max=LOG_MAX)


async def _define(handle: SpriteHandle, d: ServiceDef, *, start: bool) -> None:
    try:
        await supervisor.define(handle.agent_socket, _request(handle, d, start=start))
    except supervisor.SupervisorError as exc:
        raise SystemError_(f"the init agent refused service {d.name!r}: {exc.reason}",
                           public=f"the sprite's init agent refused service "
                                  f"'{d.name}': {exc.reason}") from None


async def boot(info_dir: Path, handle: SpriteHandle) -> None:
    """Hand every definition to a freshly started sprite's agent in `needs` order; those
    not explicitly stopped start. Never raises: a sprite starts even if a service cannot."""
    try:
        defs = await asyncio.to_thread(load, info_dir)
        for d in needs_order(defs):
            await _define(handle, d, start=not d.stopped)
    except Exception as exc:
        log.warning("starting the services of sprite %s failed: %s", handle.name, exc)


async def http_port(sprites: Sprites, row: SpriteRow) -> int | None:
    """The `http_port` of the sprite's service that has one, else None: where its URL goes
    when the host names no port. A cold sprite is woken (its disk holds the definitions);
    a running or warm one is left to the dial that follows, which wakes it."""
    if sprites.status(row) == "cold":
        await sprites.handle(row.name)
    path = sprites.settings_dir(row.id) / FILE
    try:  # every URL request asks: answer from the last read while the file is unchanged
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    except FileNotFoundError:  # no services: the common case, also answered from here
        stamp = (0, -1)
    cached = _http_ports.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    defs = await asyncio.to_thread(load, path.parent)
    port = next((d.http_port for d in defs.values() if d.http_port is not None), None)
    if len(_http_ports) > 4096:
        _http_ports.clear()
    _http_ports[path] = (stamp, port)
    return port


#: services.json path -> ((mtime_ns, size) when read, its http_port).
_http_ports: dict[Path, tuple[tuple[int, int], int | None]] = {}


def _state(d: ServiceDef, st: supervisor.ServiceStatus | None) -> dict[str, Any]:
    if st is None:
        return {"name": d.name, "status": "stopped", "restart_count": 0}
    out: dict[str, Any] = {"name": d.name, "status": st.status,
                           "restart_count": st.restart_count}
    if st.pid > 0:
        out["pid"] = st.pid
    if st.started_at > 0:
        out["started_at"] = _rfc3339(st.started_at)
    if st.next_restart_at > 0:
        out["next_restart_at"] = _rfc3339(st.next_restart_at)
    if st.error:
        out["error"] = st.error
    return out


# -- logs on the host side -----------------------------------------------------------------
def _open_log(info_dir: Path, filename: str) -> int | None:
    """Open a log file the sprite's root can write: never following a link out of the
    sprite's disk and never a FIFO or device (host root reads it)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        top = os.open(info_dir / "logs", flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        sub = os.open("services", flags | os.O_DIRECTORY, dir_fd=top)
    except OSError:
        return None
    finally:
        os.close(top)
    try:
        fd = os.open(filename, flags | os.O_NONBLOCK, dir_fd=sub)
    except OSError:
        return None
    finally:
        os.close(sub)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


class Logs:
    """Where a sprite's service log files are read: on its disk as the host mounts it (a
    container), or through the sprite's own fs agent when only the guest mounts its disk
    (a VM: `SpriteHandle.fs_connect`)."""

    def __init__(self, info_dir: Path, handle: SpriteHandle) -> None:
        self.info_dir = info_dir
        self.handle = handle

    async def read(self, filename: str, offset: int, limit: int = LOG_MAX
                   ) -> tuple[int, bytes]:
        """The file's size and up to `limit` bytes from `offset` (from the end when
        negative); (0, b"") for a file that is not there."""
        if self.handle.fs_connect is None:
            return await asyncio.to_thread(_read_host, self.info_dir, filename, offset, limit)
        try:
            stream = await _guest_fs.read(self.handle, f"/.sprite/logs/services/{filename}",
                                          as_root=True, offset=offset, limit=limit)
        except FsError:
            return 0, b""
        data = bytearray()
        try:
            async for chunk in stream:
                data += chunk
        except FsError:
            pass
        return stream.size, bytes(data)

    async def sizes(self, name: str) -> dict[str, int]:
        return {s: (await self.read(f"{name}.{s}.log", 0, 0))[0] for s in STREAMS}

    async def last_lines(self, filename: str, lines: int) -> list[str]:
        if lines <= 0:
            return []
        _size, data = await self.read(filename, -LOG_MAX)
        return data.decode(errors="replace").splitlines(keepends=True)[-lines:]


_guest_fs = Filesystem()
STREAMS = ("stdout", "stderr")


def _read_host(info_dir: Path, filename: str, offset: int, limit: int) -> tuple[int, bytes]:
    fd = _open_log(info_dir, filename)
    if fd is None:
        return 0, b""
    try:
        size = os.fstat(fd).st_size
        start = max(0, size + offset) if offset < 0 else offset
        return size, os.pread(fd, max(0, min(limit, size - start)), start) if limit else b""
    finally:
        os.close(fd)


class _Tail:
    """Follows a service's stdout and stderr log files from given offsets."""

    def __init__(self, logs: Logs, name: str, offsets: dict[str, int]) -> None:
        self.logs = logs
        self.name = name
        self.offsets = dict(offsets)

    async def read(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for s in STREAMS:
            offset = self.offsets.get(s, 0)
            size, data = await self.logs.read(f"{self.name}.{s}.log", offset)
            if size < offset:  # rotated: the new file from its start
                size, data = await self.logs.read(f"{self.name}.{s}.log", 0)
                offset = 0
            self.offsets[s] = offset + len(data)
            for i in range(0, len(data), CHUNK):
                events.append({"type": s, "data": data[i:i + CHUNK].decode(errors="replace"),
                               "timestamp": _ms()})
        return events


class SpriteServices:
    """The services of every sprite: what the routes call."""

    def __init__(self, sprites: Sprites) -> None:
        self.sprites = sprites

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[tuple[SpriteRow, SpriteHandle]]:
        """The sprite, its lock held and running (woken)."""
        sprites = self.sprites
        row = sprites.row(name)
        sprites.volume.require()
        async with sprites.lock(row.id):
            row = sprites.same(row)
            handle = await sprites.handle_locked(row)
            yield row, handle

    async def _woken(self, name: str) -> tuple[Path, SpriteHandle]:
        handle = await self.sprites.handle(name)
        return self.sprites.settings_dir(self.sprites.row(name).id), handle

    def _logs(self, handle: SpriteHandle) -> Logs:
        return Logs(self.sprites.info_dir(self.sprites.row(handle.name).id), handle)

    @staticmethod
    async def _status(handle: SpriteHandle) -> dict[str, supervisor.ServiceStatus]:
        return await supervisor.status(handle.agent_socket)

    async def list(self, name: str) -> list[dict[str, Any]]:
        info, handle = await self._woken(name)
        defs = await asyncio.to_thread(load, info)
        states = await self._status(handle)
        return [{**d.to_json(), "state": _state(d, states.get(d.name))}
                for d in sorted(defs.values(), key=lambda d: d.name)]

    async def get(self, name: str, svc: str) -> dict[str, Any]:
        info, handle = await self._woken(name)
        d = (await asyncio.to_thread(load, info)).get(svc)
        if d is None:
            raise ServiceNotFound(svc)
        states = await self._status(handle)
        return {**d.to_json(), "state": _state(d, states.get(svc))}

    async def put(self, name: str, svc: str, body: object,
                  duration: float) -> AsyncIterator[dict[str, Any]]:
        """Create or replace `svc` and start it (a running one restarts on the new
        definition); then its output for `duration` seconds."""
        new = ServiceDef.parse(svc, body)  # refused before the sprite is woken
        async with self._locked(name) as (row, handle):
            info = self.sprites.settings_dir(row.id)
            defs = await asyncio.to_thread(load, info)
            if new.http_port is not None and any(
                    d.http_port is not None and d.name != svc for d in defs.values()):
                raise Conflict(_HOST_HTTP_PORT_MSG)
            if svc not in defs and len(defs) >= MAX_SERVICES:
                raise BadRequest(f"a sprite has at most {MAX_SERVICES} services")
            _request(handle, new, start=True)  # refused here, before it is stored
            defs[svc] = new
            offsets = await self._logs(handle).sizes(svc)
            await asyncio.to_thread(save, info, defs)
            old = (await self._status(handle)).get(svc)
            await _define(handle, new, start=True)
        return self._follow_start(handle, svc, offsets, duration,
                                  replacing=old.pid if old is not None else 0)

    async def delete(self, name: str, svc: str) -> None:
        """Stop it (SIGTERM, SIGKILL after the stop timeout) and drop its definition; its
        log files stay."""
        async with self._locked(name) as (row, handle):
            info = self.sprites.settings_dir(row.id)
            defs = await asyncio.to_thread(load, info)
            if svc not in defs:
                raise ServiceNotFound(svc)
            users = sorted(d.name for d in defs.values() if svc in d.needs)
            if users:
                raise Conflict(f"service '{svc}' is needed by {', '.join(users)}")
            del defs[svc]
            await asyncio.to_thread(save, info, defs)
            with contextlib.suppress(supervisor.SupervisorError):  # never handed over
                await supervisor.delete(handle.agent_socket, svc, DEFAULT_STOP_TIMEOUT)

    async def _mark(self, name: str, svc: str, *, stopped: bool
                    ) -> tuple[Path, SpriteHandle, ServiceDef]:
        async with self._locked(name) as (row, handle):
            info = self.sprites.settings_dir(row.id)
            defs = await asyncio.to_thread(load, info)
            d = defs.get(svc)
            if d is None:
                raise ServiceNotFound(svc)
            if d.stopped != stopped:
                d.stopped = stopped
                await asyncio.to_thread(save, info, defs)
            return info, handle, d

    async def start(self, name: str, svc: str,
                    duration: float) -> AsyncIterator[dict[str, Any]]:
        info, handle, d = await self._mark(name, svc, stopped=False)
        offsets = await self._logs(handle).sizes(svc)
        old = (await self._status(handle)).get(svc)
        await self._agent_start(handle, d)
        # one still stopping is started again once it is gone; one running is left alone
        replacing = old.pid if old is not None and old.status == "stopping" else 0
        return self._follow_start(handle, svc, offsets, duration, replacing=replacing)

    async def _agent_start(self, handle: SpriteHandle, d: ServiceDef) -> None:
        try:
            await supervisor.start(handle.agent_socket, d.name)
        except supervisor.SupervisorError:  # the agent never heard of it: hand it over
            await _define(handle, d, start=True)

    async def stop(self, name: str, svc: str,
                   timeout: float) -> AsyncIterator[dict[str, Any]]:
        """`stopping`, `stopped{exit_code}`, `complete`; 409 if it has no process."""
        info, handle = await self._woken(name)
        if svc not in await asyncio.to_thread(load, info):
            raise ServiceNotFound(svc)
        st = (await self._status(handle)).get(svc)
        if st is None or st.status not in ("running", "starting", "stopping"):
            raise ServiceNotRunning(svc)
        await self._mark(name, svc, stopped=True)
        await supervisor.stop(handle.agent_socket, svc, timeout)
        return self._follow_stop(handle, svc, timeout, then_complete=True)

    async def restart(self, name: str, svc: str,
                      duration: float) -> AsyncIterator[dict[str, Any]]:
        """The stop events (if it runs), then the start events."""
        info, handle, d = await self._mark(name, svc, stopped=False)
        st = (await self._status(handle)).get(svc)
        running = st is not None and st.pid > 0

        async def events() -> AsyncIterator[dict[str, Any]]:
            if running:
                await supervisor.stop(handle.agent_socket, svc, DEFAULT_STOP_TIMEOUT)
                async for ev in self._follow_stop(handle, svc, DEFAULT_STOP_TIMEOUT,
                                                  then_complete=False):
                    yield ev
            offsets = await self._logs(handle).sizes(svc)
            await self._agent_start(handle, d)
            async for ev in self._follow_start(handle, svc, offsets, duration):
                yield ev

        return events()

    async def signal(self, name: str, svc: str, signum: int) -> None:
        info, handle = await self._woken(name)
        if svc not in await asyncio.to_thread(load, info):
            raise ServiceNotFound(svc)
        try:
            await supervisor.signal(handle.agent_socket, svc, signum)
        except supervisor.SupervisorError:
            raise ServiceNotRunning(svc) from None

    async def logs(self, name: str, svc: str, lines: int,
                   duration: float) -> AsyncIterator[dict[str, Any]]:
        """The last `lines` lines of stdout, then of stderr (the order between the two
        streams is not kept), then new output for `duration` seconds, then `complete`."""
        info, handle = await self._woken(name)
        if svc not in await asyncio.to_thread(load, info):
            raise ServiceNotFound(svc)
        logs = self._logs(handle)
        offsets = await logs.sizes(svc)
        backlog = {s: await logs.last_lines(f"{svc}.{s}.log", lines) for s in STREAMS}

        async def events() -> AsyncIterator[dict[str, Any]]:
            for s in STREAMS:
                for line in backlog[s]:
                    yield {"type": s, "data": line, "timestamp": _ms()}
            tail = _Tail(logs, svc, offsets)
            loop = asyncio.get_running_loop()
            end = loop.time() + duration
            while loop.time() < end:
                await asyncio.sleep(min(POLL, max(0.0, end - loop.time())))
                for ev in await tail.read():
                    yield ev
            yield {"type": "complete", "log_files": _log_files(svc), "timestamp": _ms()}

        return events()

    # -- event streams -------------------------------------------------------------------
    async def _follow_start(self, handle: SpriteHandle, svc: str,
                            offsets: dict[str, int], duration: float, *,
                            replacing: int = 0) -> AsyncIterator[dict[str, Any]]:
        """`started`, its output, then `complete` after `duration` or `exit` if the process
        ends first (the agent restarts it; that is not followed). `replacing`: the pid of
        a process the agent is stopping first; its end is not this start's `exit`."""
        tail = _Tail(self._logs(handle), svc, offsets)
        loop = asyncio.get_running_loop()
        try:
            first = (await self._status(handle)).get(svc)
            give_up = loop.time() + DEFAULT_STOP_TIMEOUT + 5.0
            while replacing and first is not None and first.pid == replacing:
                if loop.time() >= give_up:
                    raise SpriteUnresponsive(f"service '{svc}' did not stop for its restart")
                await asyncio.sleep(POLL)
                first = (await self._status(handle)).get(svc)
            end = loop.time() + duration
            yield {"type": "started", "timestamp": _ms()}
            pid = first.pid if first is not None else 0
            while True:
                for ev in await tail.read():
                    yield ev
                st = (await self._status(handle)).get(svc)
                if st is None or st.pid != pid or pid == 0:
                    for ev in await tail.read():
                        yield ev
                    code = st.last_exit if st is not None else -1
                    yield {"type": "exit", "exit_code": code, "timestamp": _ms()}
                    return
                if loop.time() >= end:
                    break
                await asyncio.sleep(min(POLL, max(0.0, end - loop.time())))
        except (WispError, supervisor.SupervisorError) as exc:
            message = exc.public_message if isinstance(exc, WispError) else str(exc)
            yield {"type": "error", "data": message, "timestamp": _ms()}
            return
        yield {"type": "complete", "log_files": _log_files(svc), "timestamp": _ms()}

    async def _follow_stop(self, handle: SpriteHandle, svc: str, timeout: float, *,
                           then_complete: bool) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "stopping", "timestamp": _ms()}
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout + 5.0  # SIGKILL comes at `timeout`
        try:
            while True:
                st = (await self._status(handle)).get(svc)
                if st is None or (st.pid == 0 and st.status in ("stopped", "failed")):
                    code = st.last_exit if st is not None else -1
                    yield {"type": "stopped", "exit_code": code, "timestamp": _ms()}
                    break
                if loop.time() >= end:
                    raise SpriteUnresponsive(f"service '{svc}' did not stop")
                await asyncio.sleep(POLL)
        except (WispError, supervisor.SupervisorError) as exc:
            message = exc.public_message if isinstance(exc, WispError) else str(exc)
            yield {"type": "error", "data": message, "timestamp": _ms()}
            return
        if then_complete:
            yield {"type": "complete", "log_files": _log_files(svc), "timestamp": _ms()}
