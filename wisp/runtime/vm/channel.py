"""wisp-init's protocol carried over a byte stream: the VM runtime's agent channel.

Inside a VM sprite wisp-init listens on its usual SOCK_SEQPACKET socket, and its clients pass
it open file descriptors (a process's stdio pipes, and get back a PTY master). The host
reaches the guest only through a byte stream (a TCP connection that QEMU forwards into the
guest), which cannot carry an fd. So the two relays (`wisp.runtime.vm.relay` on the host,
the guest's `relay.py`, both built on this module) *materialize* every fd that crosses:
the side holding the original sends its access mode, the other side makes a pipe (a
socketpair for a read-write fd) and hands its local peer the end with the same mode, and
both relays copy bytes between the original and the twin's other end. Everything above the
host relay (exec, sessions, services, adoption) is unchanged: it sees wisp-init's socket.

One stream connection per agent connection, so TCP's flow control is the backpressure: a
relay that cannot write into a full pipe stops reading frames (a slow reader slows every
stream of its own process only).

This file imports only the standard library: the guest runs it from its initramfs.

Frames: `type (1) | id (1) | length (4, big endian) | payload`
    P  a packet; id = number of fds; payload = per fd its mode (r, w or b) and its stream
       id (a byte each), the count of "copies" (1 byte, see below), then the packet's bytes
    D  bytes for stream `id`
    E  the end of stream `id` in the frame's direction

Stream ids are chosen by the side holding the original fd: 1..127 host, 128..255 guest.

Copies: a spawn request carries the child's three ends and then copies of the server's own
ends (which wisp-init keeps, so that a process outlives its server). The host sends only
the child's ends and the number of copies; the guest relay appends its own ends of the
twins it made, which are what a later server's `adopt` reads from.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Sequence

__all__ = ["Link", "HEADER", "HOST_IDS", "GUEST_IDS", "MAX_PAYLOAD", "read_frame",
           "received_fds", "recv_packet", "send_packet"]

log = logging.getLogger("wisp.runtime.vm.channel")

HEADER = struct.Struct(">BBI")
#: A packet is at most wisp-init's 1 MiB request plus its fd modes; data frames are smaller.
MAX_PAYLOAD = (1 << 20) + 512
CHUNK = 65536
#: How long a link whose local side ended still relays output already written (a process
#: whose background child keeps its stdout open would otherwise hold the link forever).
DRAIN_TIMEOUT = 5.0
HOST_IDS = 1
GUEST_IDS = 128
_P, _D, _E = b"P"[0], b"D"[0], b"E"[0]


def _mode(fd: int) -> bytes:
    acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    return b"r" if acc == os.O_RDONLY else b"w" if acc == os.O_WRONLY else b"b"


async def recv_packet(sock: socket.socket, size: int = MAX_PAYLOAD) -> tuple[bytes, list[int]]:
    """One SEQPACKET packet and the fds it carries; b"" with no fds at EOF."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(4 * 8),
                                                    socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await _ready(loop, sock.fileno(), write=False)
            continue
        except ConnectionResetError:
            # Our peer closed with a packet of ours unread; what it sent is still queued.
            continue
        return data, received_fds(anc)


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message of `recvmsg` carried (a cut-off last one dropped)."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


async def send_packet(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    loop = asyncio.get_running_loop()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while True:
        try:
            sock.sendmsg([data], anc)
            return
        except BlockingIOError:
            await _ready(loop, sock.fileno(), write=True)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes] | None:
    """The next frame, or None at the end of the stream (or past the size limit)."""
    try:
        kind, sid, size = HEADER.unpack(await reader.readexactly(HEADER.size))
        if size > MAX_PAYLOAD:
            return None
        return kind, sid, await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, done)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


class _Stream:
    """One local fd the link copies bytes from (`reads`) and/or into (`writes`)."""

    def __init__(self, sid: int, fd: int, reads: bool, writes: bool) -> None:
        self.sid = sid
        self.fd = fd
        self.reads = reads
        self.writes = writes
        self.task: asyncio.Task[None] | None = None
        os.set_blocking(fd, False)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def end_writing(self) -> None:
        """The remote side's data ended: EOF for whoever reads our end."""
        self.writes = False
        if self.fd < 0:
            return
        if self.reads:
            # A socketpair end: half-close. A PTY master cannot be half-closed: a
            # terminal's input ends only with its process.
            with contextlib.suppress(OSError):
                socket.socket(fileno=os.dup(self.fd)).shutdown(socket.SHUT_WR)
            return
        self.close()


class Link:
    """Relays one agent connection between `packets` (a local SEQPACKET socket: the
    server's connection on the host, wisp-init's in the guest) and a byte stream."""

    def __init__(self, packets: socket.socket, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, first_id: int) -> None:
        packets.setblocking(False)
        self.packets = packets
        self.reader = reader
        self.writer = writer
        self._next_id = first_id
        self._last_id = first_id + 126
        self.streams: dict[int, _Stream] = {}
        self._send_lock = asyncio.Lock()

    async def run(self, first: tuple[int, int, bytes] | None = None) -> None:
        """Relay until either side ends; then close every fd this link holds. `first`: a
        frame (kind, id, payload) its caller read already to see what the connection is."""
        up = asyncio.create_task(self._packets_to_stream())
        down = asyncio.create_task(self._stream_to_packets(first))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up in done and not down.done():
                # The local side ended (wisp-init closes after a process's exit): what the
                # process wrote before it exited is still on its way through the pumps.
                pumps = [st.task for st in self.streams.values()
                         if st.task is not None and not st.task.done()]
                if pumps:
                    await asyncio.wait(pumps, timeout=DRAIN_TIMEOUT)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.warning("agent channel: %r", t.exception())
        finally:
            for t in (up, down, *[s.task for s in self.streams.values() if s.task]):
                t.cancel()
            for s in self.streams.values():
                s.close()
            self.streams.clear()
            self.packets.close()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    # -- sending ----------------------------------------------------------------------------
    async def _frame(self, kind: int, sid: int, payload: bytes = b"") -> None:
        async with self._send_lock:
            self.writer.write(HEADER.pack(kind, sid, len(payload)) + payload)
            await self.writer.drain()

    async def send_packet(self, data: bytes, fds: list[int], copies: int = 0) -> None:
        """Send a packet with fds we hold the originals of; they become streams."""
        modes = b""
        for fd in fds:
            mode = _mode(fd)
            sid = self._new_id()
            modes += mode + bytes([sid])
            self._add(sid, fd, reads=mode in (b"r", b"b"), writes=mode in (b"w", b"b"))
        await self._frame(_P, len(fds), modes + bytes([copies]) + data)

    def _new_id(self) -> int:
        if self._next_id > self._last_id:
            raise OSError(errno.EMFILE, "too many streams on one agent connection")
        sid = self._next_id
        self._next_id += 1
        return sid

    def _add(self, sid: int, fd: int, reads: bool, writes: bool) -> _Stream:
        if sid in self.streams:
            raise ValueError(f"stream {sid} twice")
        s = _Stream(sid, fd, reads, writes)
        self.streams[sid] = s
        if reads:
            s.task = asyncio.create_task(self._pump(s))
        return s

    async def _pump(self, s: _Stream) -> None:
        loop = asyncio.get_running_loop()
        while s.fd >= 0:
            try:
                data = os.read(s.fd, CHUNK)
            except BlockingIOError:
                await _ready(loop, s.fd, write=False)
                continue
            except OSError as e:
                if e.errno not in (errno.EIO, errno.ECONNRESET, errno.EBADF):
                    raise
                data = b""
            if not data:
                s.reads = False
                if not s.writes:
                    s.close()
                await self._frame(_E, s.sid)
                return
            await self._frame(_D, s.sid, data)

    # -- the local side -----------------------------------------------------------------------
    async def _packets_to_stream(self) -> None:
        while True:
            data, fds = await recv_packet(self.packets)
            if not data and not fds:
                return
            await self.forward(data, fds)

    async def forward(self, data: bytes, fds: list[int]) -> None:
        """A local packet goes out; the host side overrides this for spawn's copies."""
        await self.send_packet(data, fds)

    # -- the remote side ----------------------------------------------------------------------
    async def _stream_to_packets(self, first: tuple[int, int, bytes] | None) -> None:
        while True:
            if first is not None:
                (kind, sid, payload), first = first, None
            else:
                frame = await read_frame(self.reader)
                if frame is None:
                    return
                kind, sid, payload = frame
            if kind == _P:
                if not await self._deliver(sid, payload):
                    return
            elif kind == _D:
                s = self.streams.get(sid)
                if s is not None and s.writes and s.fd >= 0:
                    await self._write(s, payload)
            elif kind == _E:
                s = self.streams.get(sid)
                if s is not None:
                    s.end_writing()
            else:
                return

    async def _write(self, s: _Stream, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view and s.fd >= 0:
            try:
                n = os.write(s.fd, view)
            except BlockingIOError:
                await _ready(loop, s.fd, write=True)
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.EIO, errno.EBADF, errno.ECONNRESET):
                    s.writes = False  # the reader is gone: drop what it would not read
                    return
                raise
            view = view[n:]

    async def _deliver(self, nfds: int, payload: bytes) -> bool:
        """Make twins of the remote fds and pass the packet to the local side."""
        if len(payload) < 2 * nfds + 1:
            return False
        modes, copies, data = payload[:2 * nfds], payload[2 * nfds], payload[2 * nfds + 1:]
        if copies > nfds:
            return False
        handed: list[int] = []
        ours: list[int] = []
        try:
            for i in range(nfds):
                mode, sid = modes[2 * i], modes[2 * i + 1]
                if sid in self.streams:  # an id the remote used twice: a bad peer
                    return False
                if mode == b"b"[0]:
                    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    hand, mine = a.detach(), b.detach()
                    reads = writes = True
                elif mode == b"r"[0]:
                    hand, mine = os.pipe2(os.O_CLOEXEC)  # they read, we write
                    reads, writes = False, True
                elif mode == b"w"[0]:
                    mine, hand = os.pipe2(os.O_CLOEXEC)  # they write, we read
                    reads, writes = True, False
                else:
                    return False
                handed.append(hand)
                self._add(sid, mine, reads, writes)
                ours.append(mine)
            extra = [os.dup(fd) for fd in ours[len(ours) - copies:]] if copies else []
            try:
                await send_packet(self.packets, data, handed + extra)
            except OSError:
                # The local side closed meanwhile (wisp-init right after a process's exit,
                # as the host's `stdin-close` crossed it): its end is the other task's to
                # see, after it forwarded what came before (the exit).
                pass
            finally:
                for fd in extra:
                    os.close(fd)
        finally:
            for fd in handed:
                os.close(fd)
        return True
