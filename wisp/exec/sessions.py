"""Exec sessions: one process in a sprite, its output ring, and the clients attached to it.

A session outlives its clients: when every client is gone the process keeps running and
its output keeps going into a bounded ring (`RING_BYTES`) that a later attach replays. While
at least one client is attached, output is read from the pipe only as fast as the slowest
client takes it (each chunk is sent before the next is read), so a 100 MB stream needs a
few chunks of server memory, not 100 MB, and the writer inside the sprite blocks instead.

Invariants:
* A client gets `session_info` first, then the replay of the ring, then live output, then
  the exit; every output frame precedes the exit (per-client lock, no await in between
  taking the replay snapshot and joining the live set).
* The exit is delivered once the process has exited and its output is drained: the pipes
  hit EOF, or no more data came for `DRAIN_IDLE` (a background child may hold them open),
  or `DRAIN_MAX` passed.
* A session ends when its process exits, when it is terminated (`close_sprite`), or when
  the agent connection drops (the sprite stopped): exit 137.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as _signal
import time
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from wisp.errors import Gone, SessionNotFound
from wisp.runtime import agent
from wisp.runtime.agent import AGENT_LOST_EXIT, AgentProcess, FdReader
from wisp.runtime.base import SpriteHandle

__all__ = [
    "ExecSpec",
    "Attachment",
    "Session",
    "SessionRegistry",
    "OutputRing",
    "default_env",
    "STDOUT",
    "STDERR",
    "CHUNK",
    "RING_BYTES",
]

STDOUT = 1
STDERR = 2
#: Largest output chunk read and sent at once (contract §3.0: chunk at <= 32 KiB).
CHUNK = 32 * 1024
#: Output kept per session for later attaches.
RING_BYTES = 1 << 20
#: After the process exits, output still arriving within this idle gap belongs to it.
DRAIN_IDLE = 0.2
#: ... but no longer than this after the exit (a background child may write forever).
DRAIN_MAX = 5.0
#: How long `close_sprite` waits for killed processes before giving up on them.
KILL_WAIT = 1.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_env(handle: SpriteHandle) -> dict[str, str]:
    """The environment every exec starts from; the request's `env` is laid on top."""
    user = "root" if handle.user_uid == 0 else (os.path.basename(handle.home.rstrip("/"))
                                                or "sprite")
    return {
        "PATH": DEFAULT_PATH,
        "HOME": handle.home,
        "USER": user,
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        **dict(handle.env),  # the sprite's own `environment`, set at create
    }


@dataclass(frozen=True)
class ExecSpec:
    """A parsed exec request (contract §3.1 query parameters)."""

    argv: tuple[str, ...]
    path: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    tty: bool = False
    rows: int = 24
    cols: int = 80
    stdin: bool = True
    #: Seconds the command may run on once no client is attached; None = no limit.
    max_run_after_disconnect: float | None = None


class OutputRing:
    """The newest `limit` bytes of a session's output, as (stream, chunk) pairs."""

    def __init__(self, limit: int = RING_BYTES) -> None:
        self.limit = limit
        self._chunks: deque[tuple[int, bytes]] = deque()
        self.size = 0

    def append(self, stream: int, data: bytes) -> None:
        self._chunks.append((stream, data))
        self.size += len(data)
        while self.size > self.limit and self._chunks:
            s, old = self._chunks.popleft()
            excess = self.size - self.limit
            if len(old) > excess:
                # Keep the tail of the oldest chunk so the ring holds exactly `limit` bytes.
                self._chunks.appendleft((s, old[excess:]))
                self.size -= excess
            else:
                self.size -= len(old)

    def snapshot(self) -> list[tuple[int, bytes]]:
        return list(self._chunks)


class Attachment:
    """One client of a session: a WebSocket or an HTTP exec response.

    Subclasses implement the `send_*` methods for their framing; the session calls only
    `output`, `exit` and `keepalive`, which serialize on one lock so that replay, live
    output and the exit reach the client in order. A send that raises marks the client dead;
    the session then drops it and the process carries on. Once the client is detached
    (`gone`), a send still waiting on it (a client that stopped reading) is abandoned at
    once, so the output pump is never held back by a client that has left.
    """

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.alive = True
        self.gone = asyncio.Event()
        self.done = asyncio.Event()
        self.exit_code: int | None = None

    async def send_info(self, info: dict[str, Any]) -> None:
        raise NotImplementedError

    async def send_output(self, stream: int, data: bytes) -> None:
        raise NotImplementedError

    async def send_exit(self, code: int) -> None:
        raise NotImplementedError

    async def send_keepalive(self) -> None:
        """Optional: a no-op unless the transport needs traffic to stay open."""

    async def guarded(self, send: Awaitable[None]) -> None:
        """Run one send unless the client leaves first (then raise ConnectionError)."""
        task = asyncio.ensure_future(send)
        if self.gone.is_set():
            task.cancel()
            raise ConnectionError("client left")
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
        if task.cancelled():
            raise ConnectionError("client left")
        task.result()

    async def output(self, stream: int, data: bytes) -> None:
        if not self.alive:
            return
        async with self.lock:
            if self.alive:
                try:
                    await self.guarded(self.send_output(stream, data))
                except Exception:
                    self.alive = False

    async def keepalive(self) -> None:
        if not self.alive or self.done.is_set():
            return
        async with self.lock:
            if self.alive and not self.done.is_set():
                try:
                    await self.guarded(self.send_keepalive())
                except Exception:
                    self.alive = False

    async def exit(self, code: int) -> None:
        async with self.lock:
            if self.alive:
                try:
                    await self.guarded(self.send_exit(code))
                except Exception:
                    self.alive = False
            self.exit_code = code
            self.done.set()


class Session:
    """A running (or recently exited) exec; create it with `SessionRegistry.start`."""

    def __init__(self, registry: SessionRegistry, sprite: str, sid: str, proc: AgentProcess,
                 spec: ExecSpec, cwd: str, ring_bytes: int) -> None:
        self.registry = registry
        self.sprite = sprite
        self.id = sid
        self.proc = proc
        self.spec = spec
        self.tty = spec.tty
        self.rows = spec.rows
        self.cols = spec.cols
        self.workdir = cwd
        self.command = " ".join(spec.argv)
        self.created = time.time()
        self.last_activity = self.created
        self.exited_at: float | None = None
        self.bytes_out = 0
        self.ring = OutputRing(ring_bytes)
        self.clients: list[Attachment] = []
        #: Final exit status, set once the output is drained and the exit is being delivered.
        self.exit_code: int | None = None
        self.finished = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._abandon = asyncio.Event()
        self._disconnect_timer: asyncio.Task[None] | None = None

    # ---- what clients see -------------------------------------------------------------

    def info(self, owner: bool) -> dict[str, Any]:
        """The `session_info` message (contract §3.1): first frame of every socket."""
        return {
            "type": "session_info",
            "session_id": self.id,
            "command": self.command,
            "created": int(self.created),
            "cols": self.cols,
            "rows": self.rows,
            "is_owner": owner,
            "tty": self.tty,
        }

    def listing(self) -> dict[str, Any]:
        """One item of `GET …/exec` (contract §2.9)."""
        elapsed = max(time.time() - self.created, 1.0)
        return {
            "id": self.id,
            "command": self.command,
            "workdir": self.workdir,
            "created": _rfc3339(self.created),
            "bytes_per_second": round(self.bytes_out / elapsed, 1),
            "is_active": self.exit_code is None,
            "last_activity": _rfc3339(self.last_activity),
            "tty": self.tty,
        }

    @property
    def running(self) -> bool:
        return self.exit_code is None

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Begin reading output. Call after the creating client attached (or is gone), so
        that nothing the command prints before its first client arrives is lost."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"exec-{self.sprite}-{self.id}")

    async def attach(self, client: Attachment, owner: bool = False) -> None:
        """Send session_info and the ring to `client`, then keep it in the live set."""
        replay = self.ring.snapshot()
        final = self.exit_code
        if final is None:
            self.clients.append(client)
            self._cancel_disconnect_timer()
        # The lock is free (new client): taking it does not yield, so no live frame can
        # slip in between the snapshot above and the replay below.
        async with client.lock:
            try:
                await client.guarded(client.send_info(self.info(owner)))
                for stream, data in replay:
                    await client.guarded(client.send_output(stream, data))
                if final is not None:
                    await client.guarded(client.send_exit(final))
            except Exception:
                client.alive = False
            if final is not None:
                client.exit_code = final
                client.done.set()
        if not client.alive:
            self.detach(client)

    def detach(self, client: Attachment) -> None:
        """Forget a client; the process runs on (bounded by max_run_after_disconnect)."""
        client.alive = False
        client.gone.set()
        if client in self.clients:
            self.clients.remove(client)
        limit = self.spec.max_run_after_disconnect
        if not self.clients and self.running and limit is not None:
            self._cancel_disconnect_timer()
            self._disconnect_timer = asyncio.create_task(self._kill_after(limit))

    async def write_stdin(self, data: bytes) -> None:
        if data and self.running:
            self.last_activity = time.time()
            await self.proc.write(data)

    def close_stdin(self) -> None:
        self.proc.close_stdin()

    def resize(self, rows: int | None, cols: int | None) -> None:
        if not self.tty or not self.running:
            return
        self.rows = rows or self.rows
        self.cols = cols or self.cols
        with contextlib.suppress(OSError):
            self.proc.resize(self.rows, self.cols)

    async def signal(self, signum: int) -> None:
        await self.proc.signal(signum)

    async def wait_process(self) -> int:
        """The process's exit status, as soon as the agent reports it (output may lag)."""
        return await self.proc.wait()

    async def terminate(self) -> None:
        """SIGKILL the process group and end the session; bounded in time."""
        if self.exit_code is not None:
            return
        self.start()
        await self.proc.signal(_signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.exited.wait()), KILL_WAIT)
        except TimeoutError:
            self._abandon.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.finished.wait()), DRAIN_MAX + 1)

    # ---- internals --------------------------------------------------------------------

    def _cancel_disconnect_timer(self) -> None:
        if self._disconnect_timer is not None:
            self._disconnect_timer.cancel()
            self._disconnect_timer = None

    async def _kill_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if not self.clients and self.running:
            await self.proc.signal(_signal.SIGKILL)

    async def _run(self) -> None:
        streams: list[tuple[int, FdReader]] = [(STDOUT, self.proc.stdout)]
        if self.proc.stderr is not None:
            streams.append((STDERR, self.proc.stderr))
        pumps = [asyncio.create_task(self._pump(s, r)) for s, r in streams]
        abandon = asyncio.create_task(self._abandon.wait())
        exited = asyncio.create_task(self.proc.wait())
        code = AGENT_LOST_EXIT
        try:
            await asyncio.wait({exited, abandon}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                code = exited.result()
                drained: asyncio.Future[Any] = asyncio.gather(*pumps, return_exceptions=True)
                await asyncio.wait({drained, abandon}, timeout=DRAIN_MAX,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (*pumps, abandon, exited):
                t.cancel()
            await asyncio.gather(*pumps, abandon, exited, return_exceptions=True)
            self.proc.close()
            self._cancel_disconnect_timer()
            self.exit_code = code
            self.exited_at = time.time()
            clients, self.clients = list(self.clients), []
            await asyncio.gather(*(c.exit(code) for c in clients), return_exceptions=True)
            self.finished.set()
            self.registry._retire(self)

    async def _wait_data(self, reader: FdReader) -> bool:
        """Wait for output; False once the process is gone and the stream stays quiet."""
        if not self.proc.exited.is_set():
            readable = asyncio.create_task(reader.wait_readable())
            exited = asyncio.create_task(self.proc.exited.wait())
            await asyncio.wait({readable, exited}, return_when=asyncio.FIRST_COMPLETED)
            for t in (readable, exited):
                t.cancel()
            await asyncio.gather(readable, exited, return_exceptions=True)
            if not self.proc.exited.is_set():
                return True
        try:
            await asyncio.wait_for(reader.wait_readable(), DRAIN_IDLE)
        except TimeoutError:
            return False
        return True

    async def _pump(self, stream: int, reader: FdReader) -> None:
        while True:
            data = reader.read_nowait(CHUNK)
            if data is None:
                if not await self._wait_data(reader):
                    return
                continue
            if not data:
                return
            self.bytes_out += len(data)
            self.last_activity = time.time()
            self.ring.append(stream, data)
            clients = [c for c in self.clients if c.alive]
            if clients:
                for c in clients:
                    await c.output(stream, data)
                for c in clients:
                    if not c.alive:
                        self.detach(c)
            else:
                # Nobody to wait for: read on into the ring, but let the loop breathe.
                await asyncio.sleep(0)


class SessionRegistry:
    """Every exec session of every sprite on this server, by sprite name and session id.

    Exited sessions are kept for `keep_exited` seconds (at most `max_exited` per sprite) so
    that kill answers 410 rather than 404 and a late attach still gets the output and exit.
    """

    def __init__(self, *, ring_bytes: int = RING_BYTES, keepalive_interval: float = 20.0,
                 keep_exited: float = 300.0, max_exited: int = 64) -> None:
        self.ring_bytes = ring_bytes
        #: Seconds between `{"type":"keepalive"}` frames on exec sockets (contract §3.0).
        self.keepalive_interval = keepalive_interval
        self.keep_exited = keep_exited
        self.max_exited = max_exited
        self._live: dict[str, dict[str, Session]] = {}
        self._exited: dict[str, dict[str, Session]] = {}

    async def start(self, handle: SpriteHandle, spec: ExecSpec) -> Session:
        """Spawn spec in the sprite as its user and register the session (not yet reading:
        the caller attaches its client, then calls `Session.start`)."""
        env = default_env(handle)
        env.update(spec.env)
        cwd = spec.cwd or handle.home
        proc = await agent.spawn(
            handle.agent_socket, list(spec.argv), env, cwd, handle.user_uid, handle.user_gid,
            handle.groups, spec.tty, rows=spec.rows, cols=spec.cols, stdin=spec.stdin,
            path=spec.path)
        live = self._live.setdefault(handle.name, {})
        exited = self._exited.setdefault(handle.name, {})
        sid = str(proc.pid)
        exited.pop(sid, None)
        n = 1
        while sid in live:
            # The pid was reused while the old session still drains its output.
            n += 1
            sid = f"{proc.pid}-{n}"
        session = Session(self, handle.name, sid, proc, spec, cwd, self.ring_bytes)
        live[sid] = session
        return session

    def get(self, sprite: str, sid: str) -> Session:
        """A live or recently exited session; `SessionNotFound` otherwise."""
        self._expire(sprite)
        session = self._live.get(sprite, {}).get(sid) or self._exited.get(sprite, {}).get(sid)
        if session is None:
            raise SessionNotFound(sid)
        return session

    def get_running(self, sprite: str, sid: str) -> Session:
        """Like `get`, but an exited session raises `Gone` (kill answers 410)."""
        session = self.get(sprite, sid)
        if not session.running:
            raise Gone(f"exec session '{sid}' already exited")
        return session

    def sessions(self, sprite: str) -> list[Session]:
        """Running sessions, oldest first (attached or not)."""
        return sorted((s for s in self._live.get(sprite, {}).values() if s.running),
                      key=lambda s: s.created)

    def active(self, sprite: str) -> int:
        """Sessions whose process still runs; a sprite with any should not go idle."""
        return sum(1 for s in self._live.get(sprite, {}).values() if s.running)

    async def close_sprite(self, name: str) -> None:
        """End every session of the sprite (SIGKILL, exit delivered to clients); call before
        a restore, delete or stop. Returns within about KILL_WAIT + DRAIN_MAX seconds."""
        sessions = list(self._live.get(name, {}).values())
        await asyncio.gather(*(s.terminate() for s in sessions), return_exceptions=True)
        self._exited.pop(name, None)
        if not self._live.get(name):
            self._live.pop(name, None)

    async def close_all(self) -> None:
        """End every session of every sprite (server shutdown)."""
        names = set(self._live)
        await asyncio.gather(*(self.close_sprite(n) for n in names), return_exceptions=True)

    def _retire(self, session: Session) -> None:
        live = self._live.get(session.sprite, {})
        if live.get(session.id) is session:
            del live[session.id]
        if not live:
            self._live.pop(session.sprite, None)
        exited = self._exited.setdefault(session.sprite, {})
        exited[session.id] = session
        self._expire(session.sprite)

    def _expire(self, sprite: str) -> None:
        exited = self._exited.get(sprite)
        if not exited:
            return
        cutoff = time.time() - self.keep_exited
        for sid in [sid for sid, s in exited.items()
                    if (s.exited_at or 0) < cutoff]:
            del exited[sid]
        while len(exited) > self.max_exited:
            del exited[next(iter(exited))]
        if not exited:
            self._exited.pop(sprite, None)
