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
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from wisp.network.dial import in_netns
from wisp.runtime.vm.channel import HEADER, HOST_IDS, Link, read_frame

__all__ = ["HostRelay", "connect_in_netns", "open_fs", "probe", "sync", "identity", "proc_net",
           "dial", "AGENT_PORT"]

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
    return await _ask(netns, b"H", timeout=2.0, port=port) is not None


async def _ask(netns: Path, kind: bytes, payload: bytes = b"", timeout: float = 30.0,
               port: int = AGENT_PORT) -> bytes | None:
    """One frame to the guest's relay and its answer's payload; None when the guest does
    not answer in `timeout` or answers with another kind of frame (an `E`rror)."""
    try:
        reader, writer = await asyncio.wait_for(connect_in_netns(netns, port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(HEADER.pack(kind[0], 0, len(payload)) + payload)
        await writer.drain()
        frame = await asyncio.wait_for(read_frame(reader), timeout)
        return frame[2] if frame is not None and frame[0] == kind[0] else None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


async def sync(netns: Path, timeout: float = 30.0, port: int = AGENT_PORT) -> bool:
    """Have the guest write its dirty pages to its disks (an `S` frame, answered once its
    `sync` returned): a disk image copied after this holds what the sprite wrote before.
    False when the guest does not answer in `timeout` (the copy is then crash-consistent
    only)."""
    return await _ask(netns, b"S", timeout=timeout, port=port) is not None


async def identity(netns: Path, spec: dict[str, Any], port: int = AGENT_PORT) -> bool:
    """Tell the guest who it is (an `N` frame): hostname, MAC, address and gateway,
    resolv.conf, and fresh entropy for its RNG (see guest/relay.py `identity`)."""
    return await _ask(netns, b"N", json.dumps(spec).encode(), port=port) is not None


async def proc_net(netns: Path, port: int = AGENT_PORT) -> dict[str, str] | None:
    """The sprite's /proc/net/tcp and tcp6 as the guest sees them (`T` frame)."""
    reply = await _ask(netns, b"T", timeout=10.0, port=port)
    return json.loads(reply) if reply is not None else None


async def dial(netns: Path, host: str, port: int, timeout: float = 10.0,
               agent_port: int = AGENT_PORT
               ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str | None]:
    """A TCP connection to `host:port` from inside the guest's sprite namespace (a `C`
    frame; then the stream is the connection's bytes). The third item is None when
    connected, else why not (fit for a client)."""
    reader, writer = await asyncio.wait_for(connect_in_netns(netns, agent_port), timeout)
    try:
        payload = json.dumps({"host": host, "port": port}).encode()
        writer.write(HEADER.pack(b"C"[0], 0, len(payload)) + payload)
        await writer.drain()
        frame = await asyncio.wait_for(read_frame(reader), timeout)
    except BaseException:
        writer.close()
        raise
    if frame is None or frame[0] != b"C"[0]:
        writer.close()
        return reader, writer, "the sprite's VM did not answer"
    if frame[2]:
        writer.close()
        return reader, writer, frame[2].decode(errors="replace")
    return reader, writer, None


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
