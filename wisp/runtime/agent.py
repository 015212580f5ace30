"""Asyncio client of the in-sprite init agent (`wisp/runtime/init/wisp-init.c`).

One SOCK_SEQPACKET connection per process: the request (argv, env, cwd, ids, tty) goes out
as one packet of NUL-terminated `key=value` strings, with the child's three stdio fds
attached for a non-TTY spawn. The agent answers `pid N` (carrying the PTY master for a TTY
spawn), later `exit N`. Closing the connection detaches the process; it keeps running.

The agent also keeps a copy of the host's ends (sent with the spawn; the PTY master it
made), so a process outlives its server: when the connection closes while it runs, the
agent keeps it as an "orphan" that a later server takes over with `adopt` (same
`AgentProcess`, output still waiting in the pipes). `list_orphans` lists them.

The host keeps the other ends of the pipes (or the PTY master) and reads them itself, so
the caller decides how fast output is consumed: nothing here reads ahead, which is what
lets a slow WebSocket client hold back a fast producer.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Mapping, Sequence
from pathlib import Path

from wisp.errors import BadRequest, SpriteUnresponsive, SystemError_
from wisp.runtime.vm.channel import received_fds

__all__ = [
    "AgentProcess",
    "FdReader",
    "FdWriter",
    "MAX_REQUEST",
    "AGENT_LOST_EXIT",
    "adopt",
    "list_orphans",
    "wait_ready",
    "join_cgroups",
    "spawn",
]

#: The agent refuses bigger requests (argv + env); checked here first for a clear error.
MAX_REQUEST = 1 << 20
#: Exit status reported when the agent connection drops before an exit (the sprite stopped).
AGENT_LOST_EXIT = 137
_SPAWN_TIMEOUT = 10.0
#: How long a spawn may wait for the agent's answer. Short enough that the client gets a
#: reply before its own handshake timeout (10 s in the Python SDK's WebSocket open).
ANSWER_TIMEOUT = 5.0
_RESTART_HINT = ("; restarting the sprite (POST /v1/sprites/<name>/restart, `wisp restart`) "
                 "ends every process and keeps its disk")


class _Waiter:
    """Waits for readiness of one fd; at most one waiter per fd and direction.

    `forget()` must run before the fd is closed: it drops the loop registration at once,
    so a cancelled wait cannot later unregister an unrelated fd that reused the number, and
    it wakes a pending wait so that a writer blocked on a full pipe sees the close.
    """

    def __init__(self, fd: int, write: bool) -> None:
        self.fd = fd
        self.write = write
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fut: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._fut = fut

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if self.write:
            loop.add_writer(self.fd, ready)
        else:
            loop.add_reader(self.fd, ready)
        self._loop = loop
        try:
            await fut
        finally:
            self.forget()

    def forget(self) -> None:
        """Drop the registration; a wait in progress returns (the caller re-checks state)."""
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(None)
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        if self.write:
            loop.remove_writer(self.fd)
        else:
            loop.remove_reader(self.fd)


class FdReader:
    """Reads a pipe or PTY master on demand; `b""` means EOF (EIO on a PTY counts as EOF)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._waiter = _Waiter(fd, write=False)
        self.closed = False

    def read_nowait(self, n: int) -> bytes | None:
        """Whatever is there now (at most n bytes), b"" at EOF, None if nothing yet."""
        if self.closed:
            return b""
        try:
            return os.read(self.fd, n)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise

    async def wait_readable(self) -> None:
        if self.closed:
            return
        await self._waiter.wait()

    async def read(self, n: int) -> bytes:
        while True:
            data = self.read_nowait(n)
            if data is not None:
                return data
            await self.wait_readable()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._waiter.forget()
            os.close(self.fd)


class FdWriter:
    """Writes to a pipe or PTY master without blocking the loop; waits while it is full."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._waiter = _Waiter(fd, write=True)
        self.closed = False
        self._lock = asyncio.Lock()

    async def write(self, data: bytes) -> None:
        """Write all of data; silently drops it once the reader is gone (EPIPE/EIO)."""
        view = memoryview(data)
        async with self._lock:
            while view and not self.closed:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    await self._waiter.wait()
                    continue
                except OSError as e:
                    if e.errno in (errno.EPIPE, errno.EIO, errno.EBADF):
                        self.close()
                        return
                    raise
                view = view[n:]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._waiter.forget()
            os.close(self.fd)


_background: set[asyncio.Task[None]] = set()


class AgentProcess:
    """A process started by the agent.

    `stdout` reads the stdout pipe, or the PTY master (stdout and stderr merged) for a TTY
    process; `stderr` is None for a TTY process. `write`/`close_stdin` feed stdin (the PTY
    for a TTY process); `close()` detaches: every host fd is closed and the process runs on.
    """

    def __init__(self, sock: socket.socket, pid: int, tty: bool, stdout: FdReader,
                 stderr: FdReader | None, stdin: FdWriter | None, master: int | None) -> None:
        self.pid = pid
        self.tty = tty
        self.stdout = stdout
        self.stderr = stderr
        self._stdin = stdin
        self._master = master
        self._sock = sock
        self._rwait = _Waiter(sock.fileno(), write=False)
        self._wwait = _Waiter(sock.fileno(), write=True)
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._monitor = asyncio.create_task(self._watch())
        self._closed = False

    async def _watch(self) -> None:
        """Waits for `exit N`; a connection lost before it means the sprite went away."""
        code = AGENT_LOST_EXIT
        try:
            while True:
                try:
                    data, fds = await _recv(self._sock, self._rwait)
                except ConnectionResetError:
                    # The agent closed with a message of ours unread; the kernel reports
                    # that before the packets still queued for us (its "exit"): read on.
                    continue
                for fd in fds:
                    os.close(fd)
                if not data:
                    break
                if data.startswith(b"exit "):
                    code = int(data[5:])
                    break
        except (OSError, ValueError):
            pass
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    @property
    def exited(self) -> asyncio.Event:
        return self._exited

    async def write(self, data: bytes) -> None:
        if self._stdin is not None and data:
            await self._stdin.write(data)

    def close_stdin(self) -> None:
        """EOF for a pipe; a no-op for a TTY, whose input ends only with the process.
        The agent holds a copy of the stdin end too: it is told to close it."""
        if self._stdin is not None and not self.tty and not self._stdin.closed:
            self._stdin.close()
            if self._closed or self.returncode is not None:
                return
            try:
                self._sock.send(b"stdin-close", socket.MSG_DONTWAIT)
            except BlockingIOError:
                # A full socket buffer (never seen with messages this small): queue it.
                task = asyncio.create_task(self._send_later(b"stdin-close"))
                _background.add(task)
                task.add_done_callback(_background.discard)
            except OSError:
                pass

    async def _send_later(self, msg: bytes) -> None:
        with contextlib.suppress(OSError):
            await _send(self._sock, msg)

    @property
    def stdin_open(self) -> bool:
        return self._stdin is not None and not self._stdin.closed

    async def signal(self, signum: int) -> None:
        """Signal the process group (the agent made the process a session leader)."""
        if self.returncode is not None or self._closed:
            return
        try:
            await _send(self._sock, b"signal %d" % signum, waiter=self._wwait)
        except OSError:
            pass

    def resize(self, rows: int, cols: int) -> None:
        """TIOCSWINSZ on the master; the kernel sends SIGWINCH to the foreground group.

        Done here, at once, when our end is the master itself (a container): input written
        after a resize then always sees the new size. A VM's end is a relay's socket: the
        agent sets the size on the master it keeps (`resize R C`), which may land after
        input written just after it."""
        if self._master is None or self._closed or self.returncode is not None:
            return
        if os.isatty(self._master):
            fcntl.ioctl(self._master, termios.TIOCSWINSZ,
                        struct.pack("HHHH", rows, cols, 0, 0))
            return
        msg = b"resize %d %d" % (rows, cols)
        try:
            self._sock.send(msg, socket.MSG_DONTWAIT)
        except BlockingIOError:
            task = asyncio.create_task(self._send_later(msg))
            _background.add(task)
            task.add_done_callback(_background.discard)
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._monitor.cancel()
        for f in (self.stdout, self.stderr, self._stdin):
            if f is not None:
                f.close()
        if self._master is not None:
            os.close(self._master)
        self._rwait.forget()
        self._wwait.forget()
        self._sock.close()


async def _recv(sock: socket.socket, waiter: _Waiter | None = None,
                size: int = 4096) -> tuple[bytes, list[int]]:
    """One packet (up to `size` bytes) and any fds it carries."""
    waiter = waiter or _Waiter(sock.fileno(), write=False)
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(
                size, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await waiter.wait()
            continue
        return data, received_fds(anc)


async def _send(sock: socket.socket, data: bytes, fds: Sequence[int] = (),
                waiter: _Waiter | None = None) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    waiter = waiter or _Waiter(sock.fileno(), write=True)
    while True:
        try:
            sock.sendmsg([data], anc)
            return
        except BlockingIOError:
            await waiter.wait()


def _fit_send_buffer(conn: socket.socket, size: int) -> None:
    """A SEQPACKET message must fit the send buffer whole; root may raise it past
    wmem_max (SO_SNDBUFFORCE). Small requests fit the default."""
    if size <= 200_000:
        return
    for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
        try:
            conn.setsockopt(socket.SOL_SOCKET, opt, size + 65536)
            return
        except OSError:
            continue


async def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return sock


async def _reach(sock: Path) -> socket.socket:
    """A connection to the agent, or `SpriteUnresponsive` within `ANSWER_TIMEOUT`."""
    try:
        return await asyncio.wait_for(_connect(sock), ANSWER_TIMEOUT)
    except (TimeoutError, OSError):
        raise SpriteUnresponsive("the sprite's init agent cannot be reached"
                                 + _RESTART_HINT) from None


async def _ask(conn: socket.socket, request: bytes, size: int = 4096
               ) -> tuple[bytes, list[int]]:
    """Send one request and read the one reply packet (with any fds), each within
    `ANSWER_TIMEOUT`, or `SpriteUnresponsive`."""
    try:
        await asyncio.wait_for(_send(conn, request), ANSWER_TIMEOUT)
        return await asyncio.wait_for(_recv(conn, size=size), ANSWER_TIMEOUT)
    except (TimeoutError, OSError):
        raise SpriteUnresponsive("the sprite's init agent did not answer"
                                 + _RESTART_HINT) from None


async def wait_ready(sock: Path, timeout: float) -> None:
    """Return once the agent accepts connections; raise `SystemError_` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: OSError | None = None
    while True:
        try:
            s = await _connect(sock)
        except OSError as e:
            last = e
        else:
            s.close()
            return
        if loop.time() >= deadline:
            raise SystemError_(f"init agent at {sock} not ready after {timeout:.1f}s: {last}",
                               public="the sprite's init agent did not start")
        await asyncio.sleep(0.005)


async def join_cgroups(sock: Path, procs_files: Sequence[Path]) -> None:
    """Hand the agent the `cgroup.procs` files every spawned process must join (opened
    here, by host root, which is what lets the process move itself in: the kernel checks
    the opener's credentials). Raises `SystemError_` if the agent does not take them."""
    fds: list[int] = []
    try:
        for path in procs_files:
            fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        conn = await asyncio.wait_for(_connect(sock), _SPAWN_TIMEOUT)
        try:
            await asyncio.wait_for(_send(conn, b"cgroups\0", fds), _SPAWN_TIMEOUT)
            reply, extra = await asyncio.wait_for(_recv(conn), _SPAWN_TIMEOUT)
            for fd in extra:
                os.close(fd)
        finally:
            conn.close()
    except (OSError, TimeoutError) as e:
        raise SystemError_(f"handing workload cgroups to the init agent at {sock}: {e}",
                           public="the sprite's init agent did not start") from None
    finally:
        for fd in fds:
            os.close(fd)
    if reply != b"ok":
        raise SystemError_(f"the init agent refused its workload cgroups: {reply[:100]!r}",
                           public="the sprite's init agent did not start")


def _encode_request(argv: Sequence[str], env: Mapping[str, str], cwd: str, uid: int, gid: int,
                    groups: Sequence[int], tty: bool, rows: int, cols: int,
                    path: str | None) -> bytes:
    fields = [b"spawn"]
    if path:
        fields.append(b"path=" + os.fsencode(path))
    fields += [b"arg=" + os.fsencode(a) for a in argv]
    fields += [b"env=" + os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    fields += [
        b"cwd=" + os.fsencode(cwd),
        b"uid=%d" % uid,
        b"gid=%d" % gid,
        b"groups=" + ",".join(str(g) for g in groups).encode(),
        b"tty=%d" % int(tty),
        b"rows=%d" % rows,
        b"cols=%d" % cols,
    ]
    for f in fields:
        if b"\0" in f:
            raise BadRequest("argv, env and dir must not contain NUL bytes")
    for k in env:
        if not k or "=" in k:
            raise BadRequest(f"invalid environment variable name {k!r}")
    if not argv:
        raise BadRequest("empty command")
    if not (1 <= rows <= 65535 and 1 <= cols <= 65535):
        raise BadRequest("rows and cols must be between 1 and 65535")
    return b"\0".join(fields) + b"\0"


def _refusal(reply: bytes) -> Exception:
    """The error for an agent's `error MESSAGE` (or a dropped connection). Its messages
    are fixed strings and strerror texts from wisp-init, never host paths."""
    if not reply:
        return SpriteUnresponsive("the sprite's init agent closed the connection"
                                  + _RESTART_HINT)
    msg = reply[6:].decode(errors="replace") if reply.startswith(b"error ") else ""
    if msg.startswith(("fork:", "pty:")):
        # The workload cannot hold one more process (pids or memory limit, or ptys).
        return SpriteUnresponsive(f"the sprite cannot start a process ({msg}); its "
                                  "process or memory limit is reached" + _RESTART_HINT)
    return SystemError_(f"init agent refused the spawn: {msg or repr(reply[:100])}",
                        public="the sprite's init agent refused the request")


async def spawn(sock: Path, argv: Sequence[str], env: Mapping[str, str], cwd: str, uid: int,
                gid: int, groups: Sequence[int], tty: bool, rows: int = 24, cols: int = 80,
                stdin: bool = True, path: str | None = None) -> AgentProcess:
    """Start argv in the sprite whose agent listens on `sock`.

    `env` is the whole environment (PATH in it is used to find argv[0], or `path` when
    given). `stdin=False` gives the child /dev/null. Raises `BadRequest` for a request the
    agent cannot take, `SystemError_` when the agent is unreachable or refuses.
    """
    request = _encode_request(argv, env, cwd, uid, gid, groups, tty, rows, cols, path)
    if len(request) > MAX_REQUEST:
        raise BadRequest(f"command and environment too large ({len(request)} bytes)")
    conn = await _reach(sock)
    _fit_send_buffer(conn, len(request))
    mine: list[int] = []   # host ends we keep
    theirs: list[int] = []  # child ends, closed once sent
    try:
        if not tty:
            if stdin:
                r, w = os.pipe2(os.O_CLOEXEC)
                theirs.append(r)
                mine.append(w)
            else:
                theirs.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            for _ in range(2):
                r, w = os.pipe2(os.O_CLOEXEC)
                mine.append(r)
                theirs.append(w)
        try:
            # The child's three ends, then ours (the agent keeps copies: see the module doc).
            await asyncio.wait_for(_send(conn, request, theirs + mine), ANSWER_TIMEOUT)
            reply, fds = await asyncio.wait_for(_recv(conn), ANSWER_TIMEOUT)
        except TimeoutError:
            raise SpriteUnresponsive(f"the sprite's init agent did not answer within "
                                     f"{ANSWER_TIMEOUT:g} s" + _RESTART_HINT) from None
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                raise BadRequest("command and environment too large") from None
            raise SpriteUnresponsive("the sprite's init agent dropped the request"
                                     + _RESTART_HINT) from None
        finally:
            for fd in theirs:
                os.close(fd)
            theirs.clear()
        if not reply.startswith(b"pid "):
            for fd in fds:
                os.close(fd)
            raise _refusal(reply)
        try:
            pid = int(reply[4:])
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise SystemError_(f"init agent sent a bad reply: {reply[:100]!r}",
                               public="the sprite's init agent sent a bad reply") from None
        if tty:
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise SystemError_("init agent sent no PTY master")
            mine.append(fds[0])
            return _tty_process(conn, pid, fds[0], mine)
        for fd in fds:
            os.close(fd)
        writer_ = FdWriter(mine[0]) if stdin else None
        return AgentProcess(conn, pid, False, FdReader(mine[-2]), FdReader(mine[-1]),
                            writer_, None)
    except BaseException:
        for fd in mine + theirs:
            try:
                os.close(fd)
            except OSError:
                pass
        conn.close()
        raise


def _tty_process(conn: socket.socket, pid: int, master: int, mine: list[int]) -> AgentProcess:
    """An AgentProcess on a PTY master (`mine` collects fds to close should this fail)."""
    reader = FdReader(os.dup(master))
    mine.append(reader.fd)
    writer = FdWriter(os.dup(master))
    return AgentProcess(conn, pid, True, reader, None, writer, master)


async def list_orphans(sock: Path) -> list[tuple[int, bool, int | None]]:
    """The agent's orphans (processes no server holds): (pid, running, exit code)."""
    conn = await _reach(sock)
    try:
        reply, fds = await _ask(conn, b"sessions\0", size=1 << 16)
    finally:
        conn.close()
    for fd in fds:
        os.close(fd)
    out: list[tuple[int, bool, int | None]] = []
    for line in reply.decode(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].isdigit():
            code = int(parts[2]) if parts[2].lstrip("-").isdigit() else -1
            running = parts[1] == "running"
            out.append((int(parts[0]), running, None if running else code))
    return out


async def adopt(sock: Path, pid: int) -> AgentProcess | None:
    """Take over orphan `pid` (one a server detached from, or lost by dying): the same
    `AgentProcess` a spawn gives, with the output the process wrote meanwhile still in its
    pipes; an orphan that exited already reports its exit at once. None when the agent
    keeps no such process (it exited and its record was freed or pushed out, or another
    connection holds it). Raises `SpriteUnresponsive` when the agent cannot be reached."""
    conn = await _reach(sock)
    fds: list[int] = []
    try:
        reply, fds = await _ask(conn, b"adopt\0pid=%d\0" % pid)
        if reply != b"pid %d" % pid or len(fds) > 3:
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        if len(fds) == 1:
            return _tty_process(conn, pid, fds[0], fds)
        while len(fds) < 2:  # the agent kept no ends: nothing to read, EOF at once
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            fds.append(r)
        stdin = FdWriter(fds[0]) if len(fds) == 3 else None
        return AgentProcess(conn, pid, False, FdReader(fds[-2]), FdReader(fds[-1]), stdin,
                            None)
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        conn.close()
        raise

