"""The sprites' resolver: one UDP socket and one TCP listener in the Wisp server's event loop.

Every DNS packet a sprite sends, to whatever address, is redirected here by the server's
nftables table (prerouting, port 53 -> `port`), so a sprite cannot ask another resolver.
The resolver knows the asking sprite by its source address (`Egress.policy`), which is
what the egress policy needs to answer per sprite and to open the answer's addresses
for that sprite only: a denied name is answered REFUSED, an allowed one is forwarded to the
upstream servers in order, and the answer's addresses are allowed for the sprite before
the answer is relayed. The policy is checked on the name asked, not on the names of a
CNAME chain in the answer: the sprite asked for that name and reaches what it points to.

Chosen over a dnsmasq per sprite by measurement (docs/network.md): ~9 KB per idle sprite
instead of a 5 MB process, and the policy's semantics (REFUSED for every denied name, exact
beats `*.suffix` beats `*`, set elements that live for the record's TTL) are expressible.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

from dnslib import QTYPE, RCODE, DNSError, DNSRecord

from wisp.network.egress import Egress, EgressError

__all__ = ["Resolver", "host_nameservers"]

log = logging.getLogger("wisp.network.dns")

UPSTREAM_TIMEOUT = 2.0
#: Queries in flight at once per server; more are answered SERVFAIL at once.
MAX_INFLIGHT = 1024


def host_nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's nameservers (the default upstream); loopback ones work too, since the
    resolver runs in the host's network namespace."""
    servers = []
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                servers.append(parts[1])
    except OSError:
        pass
    return servers


def _reply(query: DNSRecord, rcode: int) -> bytes:
    reply = query.reply()
    reply.header.rcode = rcode
    return bytes(reply.pack())


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio's)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.resolver._spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str | object, int]) -> None:
        reply = await self.resolver.answer(data, str(addr[0]), tcp=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes) -> None:
        self.query_id = query_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if data[:2] == self.query_id and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


class Resolver:
    def __init__(self, upstream: Sequence[str], egress: Egress) -> None:
        self.upstream = list(upstream)
        #: knows every attached sprite by its address, and its policy
        self.egress = egress
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> None:
        """Bind a free port, the same for UDP and TCP (the firewall redirects to it); with
        `port`, exactly that one (a restarted server keeps its predecessor's firewall,
        which redirects there) or OSError."""
        loop = asyncio.get_running_loop()
        for _ in range(20 if port == 0 else 1):
            tcp_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp_sock.bind(("0.0.0.0", port))
            except OSError:
                tcp_sock.close()
                raise
            bound = tcp_sock.getsockname()[1]
            udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp_sock.bind(("0.0.0.0", bound))
            except OSError:
                tcp_sock.close()
                udp_sock.close()
                continue
            break
        else:
            raise OSError("no free port for the sprites' resolver")
        port = bound
        self.port = port
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
        self._udp = transport
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp_sock)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= MAX_INFLIGHT:
            coro.close()
            return  # dropped: the client retries, as with any overloaded resolver
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), 10)
                data = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", head)[0]),
                                              10)
                reply = await self.answer(data, str(peer[0]), tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, data: bytes, source: str, *, tcp: bool) -> bytes | None:
        """The reply to one query from `source`, or None to drop it (not from a sprite, or
        not DNS). A denied name is REFUSED; an allowed answer's addresses are in the
        sprite's allow set before the reply leaves (`Egress.grant`)."""
        policy = self.egress.policy(source)
        if policy is None:
            return None
        try:
            query = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, struct.error):
            return None
        if query.header.qr or not query.questions:
            return None
        name = str(query.q.qname)
        if not policy.allows(name):
            return _reply(query, RCODE.REFUSED)
        for server in self.upstream:
            try:
                reply = await (self._forward_tcp(data, server) if tcp
                               else self._forward_udp(data, server))
                break
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.debug("upstream %s: %s", server, exc)
        else:
            return _reply(query, RCODE.SERVFAIL)
        policy = self.egress.policy(source)  # it may have changed while upstream answered
        if policy is None:
            return None
        if not policy.allows(name):
            return _reply(query, RCODE.REFUSED)
        try:
            answers = [(str(rr.rdata), int(rr.ttl))
                       for rr in DNSRecord.parse(reply).rr if rr.rtype == QTYPE.A]
        except (DNSError, ValueError, IndexError, struct.error):
            return _reply(query, RCODE.SERVFAIL)
        try:
            self.egress.grant(source, name, answers)
        except EgressError as exc:
            log.warning("allowing %s's answer for %s failed: %s", source, name, exc)
            return _reply(query, RCODE.SERVFAIL)
        return reply

    async def _forward_udp(self, data: bytes, server: str) -> bytes:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _UpstreamUdp(data[:2]), remote_addr=(server, 53))
        try:
            transport.sendto(data)
            return await asyncio.wait_for(proto.reply, UPSTREAM_TIMEOUT)
        finally:
            transport.close()

    async def _forward_tcp(self, data: bytes, server: str) -> bytes:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(server, 53),
                                                UPSTREAM_TIMEOUT)
        try:
            writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()
            head = await asyncio.wait_for(reader.readexactly(2), UPSTREAM_TIMEOUT)
            return await asyncio.wait_for(reader.readexactly(struct.unpack("!H", head)[0]),
                                          UPSTREAM_TIMEOUT)
        finally:
            writer.close()
