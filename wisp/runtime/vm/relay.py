"""The host end of a VM sprite's agent channel.

It listens on the path the rest of Wisp knows as the sprite's agent socket (the same
SOCK_SEQPACKET protocol wisp-init speaks in a container) and relays each connection over a
TCP connection into the guest (`channel.Link`). QEMU runs in the sprite's network namespace
and forwards a port on that namespace's loopback to the guest's relay, so the channel is
reachable only from the host process that enters the namespace: no port on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from wisp.network.dial import in_netns
from wisp.runtime.vm.channel import HEADER, HOST_IDS, Link, read_frame

__all__ = ["HostRelay", "connect_in_netns", "open_fs", "AGENT_PORT"]

log = logging.getLogger("wisp.runtime.vm")

#: The guest relay's port, forwarded from the same port on the namespace's loopback.
AGENT_PORT = 7000
async def connect_in_netns(netns: Path, port: int = AGENT_PORT
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # a socket keeps the namespace it was made in
    sock = in_netns(netns, lambda: socket.socket(socket.AF_INET,
                                                 socket.SOCK_STREAM | socket.SOCK_CLOEXEC))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=1 << 21)


#: The first frame of a connection that carries the filesystem API instead of an agent
#: connection: `F`, then the fs agent's setup JSON; the guest answers one byte `K` once its
#: fs agent holds the connection, which then speaks `wisp.fs_agent`'s protocol.
FS_FRAME = b"F"
FS_READY = b"K"


async def open_fs(netns: Path, setup: bytes, port: int = AGENT_PORT
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to a new worker of the guest's fs agent for one operation."""
    reader, writer = await connect_in_netns(netns, port)
    try:
        writer.write(HEADER.pack(FS_FRAME[0], 0, len(setup)) + setup)
        await writer.drain()
        if await asyncio.wait_for(reader.readexactly(1), 10.0) != FS_READY:
            raise ConnectionError("the guest refused the fs channel")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def probe(netns: Path, port: int = AGENT_PORT) -> bool:
    """Whether the guest's relay is up and wisp-init accepts connections: an `H` frame,
    answered with one when the relay could connect to wisp-init. (A connection QEMU
    accepts is no sign of life: it accepts before the guest does, and then closes.)"""
    try:
        reader, writer = await connect_in_netns(netns, port)
    except OSError:
        return False
    try:
        writer.write(HEADER.pack(b"H"[0], 0, 0))
        await writer.drain()
        frame = await read_frame(reader)
        return frame is not None and frame[0] == b"H"[0]
    except OSError:
        return False
    finally:
        writer.close()


async def sync(netns: Path, timeout: float = 30.0, port: int = AGENT_PORT) -> bool:
    """Have the guest write its dirty pages to its disks (an `S` frame, answered once its
    `sync` returned): a disk image copied after this holds what the sprite wrote before.
    False when the guest does not answer in `timeout` (the copy is then crash-consistent
    only)."""
    try:
        reader, writer = await asyncio.wait_for(connect_in_netns(netns, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(HEADER.pack(b"S"[0], 0, 0))
        await writer.drain()
        frame = await asyncio.wait_for(read_frame(reader), timeout)
        return frame is not None and frame[0] == b"S"[0]
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


class _HostLink(Link):
    async def forward(self, data: bytes, fds: list[int]) -> None:
        """A spawn's fds past the child's three are copies of the server's own ends,
        which the guest makes for itself (see channel.py, "Copies")."""
        if data.startswith(b"spawn\0") and len(fds) > 3:
            for fd in fds[3:]:
                os.close(fd)
            await self.send_packet(data, fds[:3], copies=len(fds) - 3)
            return
        await self.send_packet(data, fds)


class HostRelay:
    """Listens at `path` and relays every connection into the guest behind `netns`."""

    def __init__(self, path: Path, netns: Path, port: int = AGENT_PORT) -> None:
        self.path = path
        self.netns = netns
        self.port = port
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._links: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(os.fspath(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._accepting = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = asyncio.create_task(self._relay(conn))
            self._links.add(task)
            task.add_done_callback(self._links.discard)

    async def _relay(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                connect_in_netns(self.netns, self.port), 5.0)
        except (OSError, TimeoutError) as e:
            log.warning("agent channel to %s: %r", self.path.parent.name, e)
            conn.close()  # the client sees the agent close: the sprite is unreachable
            return
        await _HostLink(conn, reader, writer, HOST_IDS).run()

    async def stop(self) -> None:
        """Stop listening and end every relayed connection."""
        tasks = [t for t in (self._accepting, *self._links) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
