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
* A server that goes away without stopping the sprites (`detach_all`, or a crash) ends no
  session: the agent keeps each process with its pipes, the ring and metadata are files
  (with `state_dir`), and the next server's `adopt` carries on (docs/exec.md, "Sessions
  across a server restart").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import shutil
import signal as _signal
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wisp.errors import Gone, SessionNotFound
from wisp.runtime import agent
from wisp.runtime.agent import AGENT_LOST_EXIT, AgentProcess, FdReader
from wisp.runtime.base import SpriteHandle
from wisp.system import is_mountpoint, mount_tmpfs

log = logging.getLogger(__name__)

__all__ = [
    "ExecSpec",
    "Attachment",
    "Session",
    "SessionRegistry",
    "OutputRing",
    "FileRing",
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

    def close(self) -> None:
        """Nothing to release (see `FileRing.close`)."""

    @classmethod
    def copy_of(cls, ring: OutputRing | FileRing) -> OutputRing:
        """An in-memory ring with ring's content."""
        new = cls(ring.limit)
        for stream, data in ring.snapshot():
            new.append(stream, data)
        return new


class FileRing:
    """`OutputRing` kept in a file through mmap, so that it outlives the server process.

    Same observable content as `OutputRing`: the newest `limit` bytes, each byte with its
    stream, in order. `snapshot()` gives consecutive bytes of one stream as chunks of at
    most `CHUNK` bytes (chunk boundaries are not kept, only streams and order).

    Layout: a 4 KiB header (`_PARAMS` at 0, two `_SLOT` copies of the published state at
    64 and 128), the data ring (`limit + _SLACK` bytes, byte at absolute position p at
    p % capacity) and the run index (`runs + 1` u64 entries: the absolute start of a run
    of one stream, the stream in the top byte). Published state: seq, start and tail (the
    window [start, tail) in absolute positions), run_head and run_tail (the window's runs).

    Crash safety (a SIGKILL between any two instructions): an append writes its data and
    run entry first, into space outside the published window (the `_SLACK` beyond `limit`
    and the spare run entry), then publishes the new state into the older of the two slots
    with a CRC; a reader takes the valid slot with the higher seq. Appends larger than
    `_SLACK` are published in `_SLACK` steps. Anything that does not check out (a short or
    garbage file, other parameters) is read as an empty ring and overwritten.
    """

    _MAGIC = b"WISPRNG1"
    _PARAMS = struct.Struct("<8sQQQ")  # magic, limit, capacity, runs
    _SLOT = struct.Struct("<QQQQQ")  # seq, start, tail, run_head, run_tail; then crc32
    _SLOTS = (64, 128)
    _SLACK = 64 * 1024
    _HEADER = 4096
    #: Runs (stream switches) the index holds: past that many switches within the newest
    #: `limit` bytes, the oldest runs are dropped early (output alternating between stdout
    #: and stderr every 16 bytes or less, for the default 1 MiB).
    RUNS_MAX = 65536

    def __init__(self, path: Path, limit: int = RING_BYTES) -> None:
        """Open the ring at path, keeping its content when the file is a valid ring of the
        same `limit`; otherwise (missing, short, garbage) start it empty."""
        self.path = path
        self.limit = limit
        self._cap = limit + self._SLACK
        self._nruns = min(self.RUNS_MAX, limit + 1)
        self._data_off = self._HEADER
        self._runs_off = self._HEADER + _round_page(self._cap)
        self._total = self._runs_off + _round_page((self._nruns + 1) * 8)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fresh = os.fstat(fd).st_size != self._total
            if fresh:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, self._total)
            self._map: mmap.mmap | None = mmap.mmap(fd, self._total)
        finally:
            os.close(fd)
        self._seq = 0
        self._start = self._tail = self._rh = self._rt = 0
        #: (absolute start, stream) of the runs in the window, oldest first.
        self._runs: deque[tuple[int, int]] = deque()
        if fresh or not self._load():
            self._reset()

    @property
    def size(self) -> int:
        return self._tail - self._start

    def _reset(self) -> None:
        m = self._mapped()
        m[:self._HEADER] = bytes(self._HEADER)
        self._PARAMS.pack_into(m, 0, self._MAGIC, self.limit, self._cap, self._nruns)
        self._seq = 0
        self._start = self._tail = self._rh = self._rt = 0
        self._runs.clear()
        self._publish()

    def _load(self) -> bool:
        """Read the published state; False if anything is off (then the ring is reset)."""
        m = self._mapped()
        if self._PARAMS.unpack_from(m, 0) != (self._MAGIC, self.limit, self._cap, self._nruns):
            return False
        best: tuple[int, ...] | None = None
        for off in self._SLOTS:
            body = m[off:off + self._SLOT.size]
            (crc,) = struct.unpack_from("<I", m, off + self._SLOT.size)
            if zlib.crc32(body) == crc:
                state = self._SLOT.unpack(body)
                if best is None or state[0] > best[0]:
                    best = state
        if best is None:
            return False
        seq, start, tail, rh, rt = best
        if not (start <= tail < 1 << 56 and tail - start <= self.limit and rh <= rt
                and rt - rh <= self._nruns and (rt > rh or tail == start)):
            return False
        runs: list[tuple[int, int]] = []
        for i in range(rh, rt):
            (v,) = struct.unpack_from("<Q", m, self._runs_off + (i % (self._nruns + 1)) * 8)
            runs.append((v & ((1 << 56) - 1), v >> 56))
        starts = [r[0] for r in runs]
        if runs and (starts != sorted(set(starts)) or starts[0] > start
                     or starts[-1] >= tail or not all(1 <= r[1] <= 255 for r in runs)
                     or (len(runs) > 1 and starts[1] <= start)):
            return False
        self._seq, self._start, self._tail, self._rh, self._rt = seq, start, tail, rh, rt
        self._runs = deque(runs)
        return True

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError("ring is closed")
        return self._map

    def _publish(self) -> None:
        self._seq += 1
        body = self._SLOT.pack(self._seq, self._start, self._tail, self._rh, self._rt)
        off = self._SLOTS[self._seq & 1]
        m = self._mapped()
        m[off:off + self._SLOT.size] = body
        struct.pack_into("<I", m, off + self._SLOT.size, zlib.crc32(body))

    def append(self, stream: int, data: bytes) -> None:
        n = len(data)
        if not n:
            return
        if not 1 <= stream <= 255:
            raise ValueError(f"bad stream {stream}")
        if n > self._SLACK:
            view = memoryview(data)[max(0, n - self.limit):]
            if n >= self.limit:  # the whole window is this chunk's tail: start over
                self._tail += n - len(view)  # bytes older than the window, never stored
                self._start = self._tail
                self._rh = self._rt
                self._runs.clear()
            for i in range(0, len(view), self._SLACK):
                self._append(stream, view[i:i + self._SLACK])
            return
        self._append(stream, data)

    def _append(self, stream: int, data: bytes | memoryview) -> None:
        m = self._mapped()
        n = len(data)
        tail = self._tail
        pos = tail % self._cap
        first = min(n, self._cap - pos)
        d = self._data_off + pos
        if first == n:
            m[d:d + n] = data  # the one copy of the chunk
        else:  # wraps around the end of the data ring
            view = memoryview(data)
            m[d:d + first] = view[:first]
            m[self._data_off:self._data_off + n - first] = view[first:]
        runs = self._runs
        if not runs or runs[-1][1] != stream:
            struct.pack_into("<Q", m, self._runs_off + (self._rt % (self._nruns + 1)) * 8,
                             tail | stream << 56)
            runs.append((tail, stream))
            self._rt += 1
        self._tail = tail + n
        start = max(self._start, self._tail - self.limit)
        if len(runs) > self._nruns:
            runs.popleft()
            self._rh += 1
            start = max(start, runs[0][0])
        while len(runs) > 1 and runs[1][0] <= start:
            runs.popleft()
            self._rh += 1
        self._start = start
        self._publish()

    def snapshot(self) -> list[tuple[int, bytes]]:
        m = self._mapped()
        out: list[tuple[int, bytes]] = []
        runs = list(self._runs)
        for i, (rs, stream) in enumerate(runs):
            a = max(rs, self._start)
            b = runs[i + 1][0] if i + 1 < len(runs) else self._tail
            while a < b:
                pos = a % self._cap
                k = min(b - a, CHUNK, self._cap - pos)
                out.append((stream, m[self._data_off + pos:self._data_off + pos + k]))
                a += k
        return out

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _round_page(n: int) -> int:
    return (n + 4095) // 4096 * 4096


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
        #: Set by `drop`: the server let go of the session (detach_all), no exit follows.
        self.dropped = False

    def drop(self) -> None:
        """End this client without an exit (the server is going away, the process not)."""
        self.dropped = True
        self.alive = False
        self.gone.set()
        self.done.set()

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

    def __init__(self, registry: SessionRegistry, sprite: str, sid: str,
                 proc: AgentProcess | None, spec: ExecSpec, cwd: str,
                 ring: OutputRing | FileRing, *, pid: int | None = None,
                 created: float | None = None) -> None:
        self.registry = registry
        self.sprite = sprite
        self.id = sid
        #: None only for a session restored from disk that had already exited.
        self.proc = proc
        self.pid = pid if pid is not None else proc.pid if proc is not None else 0
        self.spec = spec
        self.tty = spec.tty
        self.rows = spec.rows
        self.cols = spec.cols
        self.workdir = cwd
        self.command = " ".join(spec.argv)
        self.created = created if created is not None else time.time()
        self.last_activity = time.time()
        self.exited_at: float | None = None
        self.bytes_out = 0
        self.ring: OutputRing | FileRing = ring
        #: Its state files are gone (close_sprite): write none again.
        self.discarded = False
        self.clients: list[Attachment] = []
        #: Final exit status, set once the output is drained and the exit is being delivered.
        self.exit_code: int | None = None
        self.finished = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._abandon = asyncio.Event()
        self._detach = asyncio.Event()
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
        self._arm_disconnect_timer()

    def _arm_disconnect_timer(self) -> None:
        limit = self.spec.max_run_after_disconnect
        if not self.clients and self.running and limit is not None:
            self._cancel_disconnect_timer()
            self._disconnect_timer = asyncio.create_task(self._kill_after(limit))

    async def write_stdin(self, data: bytes) -> None:
        if data and self.running and self.proc is not None:
            self.last_activity = time.time()
            await self.proc.write(data)

    def close_stdin(self) -> None:
        if self.proc is not None:
            self.proc.close_stdin()

    def resize(self, rows: int | None, cols: int | None) -> None:
        if not self.tty or not self.running or self.proc is None:
            return
        self.rows = rows or self.rows
        self.cols = cols or self.cols
        with contextlib.suppress(OSError):
            self.proc.resize(self.rows, self.cols)
        self.registry._save(self)

    async def signal(self, signum: int) -> None:
        if self.proc is not None:
            await self.proc.signal(signum)

    async def wait_process(self) -> int:
        """The process's exit status, as soon as the agent reports it (output may lag)."""
        if self.proc is None:
            return self.exit_code if self.exit_code is not None else AGENT_LOST_EXIT
        return await self.proc.wait()

    async def detach_server(self) -> None:
        """Let go of the process without signalling it (the server is going away and the
        process stays for the next one): stop pumping, close the host fds and the agent
        connection, drop the clients with no exit. Its files stay."""
        if self.exit_code is not None or self.proc is None:
            return
        self._detach.set()
        self.start()
        assert self._task is not None
        with contextlib.suppress(Exception):
            await asyncio.shield(self._task)

    async def terminate(self) -> None:
        """SIGKILL the process group and end the session; bounded in time."""
        if self.exit_code is not None or self.proc is None:
            return
        proc = self.proc
        self.start()
        await proc.signal(_signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(proc.exited.wait()), KILL_WAIT)
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
        if not self.clients and self.running and self.proc is not None:
            await self.proc.signal(_signal.SIGKILL)

    async def _run(self) -> None:
        proc = self.proc
        assert proc is not None
        streams: list[tuple[int, FdReader]] = [(STDOUT, proc.stdout)]
        if proc.stderr is not None:
            streams.append((STDERR, proc.stderr))
        pumps = [asyncio.create_task(self._pump(s, r)) for s, r in streams]
        abandon = asyncio.create_task(self._abandon.wait())
        detach = asyncio.create_task(self._detach.wait())
        exited = asyncio.create_task(proc.wait())
        code = AGENT_LOST_EXIT
        try:
            await asyncio.wait({exited, abandon, detach}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                code = exited.result()
                drained: asyncio.Future[Any] = asyncio.gather(*pumps, return_exceptions=True)
                await asyncio.wait({drained, abandon, detach}, timeout=DRAIN_MAX,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Detached (the server goes, the process stays) unless its exit came first.
            detached = self._detach.is_set() and not exited.done()
            for t in (*pumps, abandon, detach, exited):
                t.cancel()
            await asyncio.gather(*pumps, abandon, detach, exited, return_exceptions=True)
            proc.close()
            self._cancel_disconnect_timer()
            clients, self.clients = list(self.clients), []
            if detached:
                for c in clients:
                    c.drop()
                self.ring.close()
                self.registry._forget(self)
            else:
                self.exit_code = code
                self.exited_at = time.time()
                await asyncio.gather(*(c.exit(code) for c in clients), return_exceptions=True)
                self.finished.set()
                self.registry._retire(self)

    async def _wait_data(self, reader: FdReader) -> bool:
        """Wait for output; False once the process is gone and the stream stays quiet."""
        assert self.proc is not None
        gone = self.proc.exited
        if not gone.is_set():
            readable = asyncio.create_task(reader.wait_readable())
            exited = asyncio.create_task(gone.wait())
            await asyncio.wait({readable, exited}, return_when=asyncio.FIRST_COMPLETED)
            for t in (readable, exited):
                t.cancel()
            await asyncio.gather(readable, exited, return_exceptions=True)
            if not gone.is_set():
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

    With `state_dir`, each session's output ring is a file (`FileRing`) at
    `state_dir/<sprite>/<sid>.ring` and its metadata `<sid>.json` beside it, so that a
    server that stops (`detach_all`) or dies lets the next one `adopt` the sessions (the
    processes keep running in their sprites: see docs/exec.md).
    """

    def __init__(self, *, ring_bytes: int = RING_BYTES, keepalive_interval: float = 20.0,
                 keep_exited: float = 300.0, max_exited: int = 64,
                 state_dir: Path | None = None) -> None:
        self.ring_bytes = ring_bytes
        #: Seconds between `{"type":"keepalive"}` frames on exec sockets (contract §3.0).
        self.keepalive_interval = keepalive_interval
        self.keep_exited = keep_exited
        self.max_exited = max_exited
        self.state_dir = state_dir
        self._live: dict[str, dict[str, Session]] = {}
        self._exited: dict[str, dict[str, Session]] = {}

    def mount(self) -> None:
        """Make `state_dir` a tmpfs of its own unless it is one already (a server that
        adopts finds its predecessor's, with the rings in it).

        Why a tmpfs: every exec maps a ring and writes its metadata there; on a disk-backed
        /run (this machine kind has one) that cost ~0.9 ms per exec and disk writeback.
        Unlimited in size: the rings are sparse and bounded per session, and a full tmpfs
        would SIGBUS the server on a write into a ring's mapping. Removed with the rest of
        the server's /run/wisp/<tag> when it stops its sprites (`Runtime.release`)."""
        if self.state_dir is None or is_mountpoint(self.state_dir, "tmpfs"):
            return
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mount_tmpfs(self.state_dir, "size=0,nr_inodes=0,mode=0700")

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
        old = exited.pop(sid, None)
        if old is not None:
            old.discarded = True  # its files are about to be the new session's
        n = 1
        while sid in live:
            # The pid was reused while the old session still drains its output.
            n += 1
            sid = f"{proc.pid}-{n}"
        session = Session(self, handle.name, sid, proc, spec, cwd, self._new_ring(handle.name,
                                                                                  sid))
        live[sid] = session
        self._save(session)
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
        """End every session of the sprite (SIGKILL, exit delivered to clients) and remove
        its state files; call before a restore, delete or stop. Returns within about
        KILL_WAIT + DRAIN_MAX seconds."""
        sessions = list(self._live.get(name, {}).values())
        for s in [*sessions, *self._exited.get(name, {}).values()]:
            s.discarded = True
        await asyncio.gather(*(s.terminate() for s in sessions), return_exceptions=True)
        self._exited.pop(name, None)
        if not self._live.get(name):
            self._live.pop(name, None)
        d = self._dir(name)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)

    async def close_all(self) -> None:
        """End every session of every sprite (server shutdown that stops the sprites)."""
        names = set(self._live) | set(self._exited)
        await asyncio.gather(*(self.close_sprite(n) for n in names), return_exceptions=True)

    async def detach_all(self) -> None:
        """Server shutdown that keeps the sprites running: every session lets go of its
        process without signalling it (clients are dropped, no exit frame); the agent keeps
        the processes and their pipes, the state files stay, and the next server's `adopt`
        takes them over."""
        sessions = [s for live in self._live.values() for s in live.values()]
        await asyncio.gather(*(s.detach_server() for s in sessions), return_exceptions=True)

    async def adopt(self, handle: SpriteHandle) -> int:
        """Take over the sessions recorded on disk for this sprite (after a restart): each
        process the sprite's agent still keeps is adopted, its ring reopened from its file,
        and pumped again; one the agent no longer knows (or that had exited) becomes an
        exited session (its recorded exit, else 137) with its output, for `keep_exited`.
        Returns how many the agent handed over (running, or exited while no server held
        them: their exit follows at once)."""
        d = self._dir(handle.name)
        if d is None or not d.is_dir():
            return 0
        metas: list[dict[str, Any]] = []
        for f in sorted(d.glob("*.json")):
            meta = _read_meta(f)
            if meta is None:
                with contextlib.suppress(OSError):
                    f.unlink()
                    f.with_suffix(".ring").unlink()
                continue
            metas.append(meta)
        results = await asyncio.gather(*(self._adopt_one(handle, m) for m in metas),
                                       return_exceptions=True)
        return sum(1 for r in results if r is True)

    async def _adopt_one(self, handle: SpriteHandle, meta: dict[str, Any]) -> bool:
        name, sid = handle.name, meta["id"]
        if sid in self._live.get(name, {}) or sid in self._exited.get(name, {}):
            return False
        spec = ExecSpec(argv=tuple(meta["argv"]), path=meta.get("path"), tty=meta["tty"],
                        rows=meta["rows"], cols=meta["cols"], stdin=meta["stdin"],
                        max_run_after_disconnect=meta.get("max_run_after_disconnect"))
        d = self._dir(name)
        assert d is not None
        ring_path = d / f"{sid}.ring"
        proc: AgentProcess | None = None
        if meta.get("exit_code") is None:
            with contextlib.suppress(Exception):  # an unreachable agent: the sprite is gone
                proc = await agent.adopt(handle.agent_socket, meta["pid"])
        if proc is not None:
            ring: OutputRing | FileRing
            try:
                ring = FileRing(ring_path, meta["ring_bytes"])
            except (OSError, ValueError):
                ring = OutputRing(self.ring_bytes)
            session = Session(self, name, sid, proc, spec, meta["workdir"], ring,
                              pid=meta["pid"], created=meta["created"])
            self._live.setdefault(name, {})[sid] = session
            session.start()
            session._arm_disconnect_timer()
            return True
        exited_at = meta.get("exited_at") or time.time()
        session = Session(self, name, sid, None, spec, meta["workdir"],
                          self._load_ring(ring_path, meta["ring_bytes"]), pid=meta["pid"],
                          created=meta["created"])
        code = meta.get("exit_code")
        session.exit_code = code if isinstance(code, int) else AGENT_LOST_EXIT
        session.exited_at = exited_at
        session.finished.set()
        self._retire(session)
        return False

    def _forget(self, session: Session) -> None:
        """Drop a detached session (its process lives on in the sprite, its files stay)."""
        live = self._live.get(session.sprite, {})
        if live.get(session.id) is session:
            del live[session.id]
        if not live:
            self._live.pop(session.sprite, None)

    def _retire(self, session: Session) -> None:
        self._forget(session)
        if isinstance(session.ring, FileRing):
            # Exited: the content is final; keep it in memory (the file stays for a
            # restart) so that no mapping is held per exited session.
            frozen = OutputRing.copy_of(session.ring)
            session.ring.close()
            session.ring = frozen
        self._save(session)
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
            self._remove_files(exited.pop(sid))
        while len(exited) > self.max_exited:
            self._remove_files(exited.pop(next(iter(exited))))
        if not exited:
            self._exited.pop(sprite, None)

    # ---- state files ------------------------------------------------------------------

    def _dir(self, sprite: str) -> Path | None:
        if self.state_dir is None:
            return None
        if not sprite or "/" in sprite or sprite in (".", ".."):
            raise ValueError(f"bad sprite name {sprite!r}")
        return self.state_dir / sprite

    def _new_ring(self, sprite: str, sid: str) -> OutputRing | FileRing:
        d = self._dir(sprite)
        if d is None:
            return OutputRing(self.ring_bytes)
        path = d / f"{sid}.ring"
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a fresh ring, not a reused pid's old one
            return FileRing(path, self.ring_bytes)
        except OSError as e:
            # No room for it (a full tmpfs): in memory, as without state_dir.
            log.warning("exec session %s/%s: output ring in memory only: %s", sprite, sid, e)
            return OutputRing(self.ring_bytes)

    def _load_ring(self, path: Path, limit: int) -> OutputRing:
        """The content of a ring file, in memory (an empty ring when there is none)."""
        if not path.exists():
            return OutputRing(self.ring_bytes)
        try:
            file_ring = FileRing(path, limit)
        except (OSError, ValueError):
            return OutputRing(self.ring_bytes)
        try:
            return OutputRing.copy_of(file_ring)
        finally:
            file_ring.close()

    def _save(self, session: Session) -> None:
        """Write `<sid>.json` (atomically: a reader never sees half of it)."""
        d = self._dir(session.sprite)
        if d is None or session.discarded:
            return
        meta = {
            "id": session.id,
            "pid": session.pid,
            "command": session.command,
            "argv": list(session.spec.argv),
            "path": session.spec.path,
            "workdir": session.workdir,
            "created": session.created,
            "tty": session.tty,
            "rows": session.rows,
            "cols": session.cols,
            "stdin": session.spec.stdin,
            "max_run_after_disconnect": session.spec.max_run_after_disconnect,
            "ring_bytes": session.ring.limit,
            "exit_code": session.exit_code,
            "exited_at": session.exited_at,
        }
        final, tmp = d / f"{session.id}.json", d / f".{session.id}.json.tmp"
        try:
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, final)
        except OSError as e:
            log.warning("exec session %s/%s: metadata not saved: %s", session.sprite,
                        session.id, e)

    def _remove_files(self, session: Session) -> None:
        d = self._dir(session.sprite)
        if d is None or session.discarded:
            return
        session.discarded = True
        for f in (d / f"{session.id}.json", d / f"{session.id}.ring"):
            with contextlib.suppress(OSError):
                f.unlink()


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "pid": int, "argv": list, "workdir": str, "created": (int, float), "tty": bool,
    "rows": int, "cols": int, "stdin": bool, "ring_bytes": int,
}


def _read_meta(path: Path) -> dict[str, Any] | None:
    """A session's metadata file, or None if it is unreadable or not what `_save` writes."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind):
            return None
    if meta.get("path") is not None and not isinstance(meta["path"], str):
        return None
    limit = meta.get("max_run_after_disconnect")
    if limit is not None and (not isinstance(limit, (int, float)) or limit < 0):
        return None
    code = meta.get("exit_code")
    if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
        return None
    if (meta["id"] != path.stem or meta["pid"] <= 0 or meta["ring_bytes"] <= 0
            or not meta["argv"] or not all(isinstance(a, str) for a in meta["argv"])
            or not (1 <= meta["rows"] <= 65535 and 1 <= meta["cols"] <= 65535)):
        return None
    return meta
