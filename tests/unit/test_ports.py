"""`wisp.ports` parts that need no sprite: the /proc/net parser and socket owners (on this
process's own namespace and sockets), the proxy's first message, the byte pump over real
TCP sockets, and the CLI's mapping syntax."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from wisp.cli.proxy import Mapping, parse_mapping
from wisp.errors import BadRequest
from wisp.ports import Target, parse_proc_net, parse_target, pump, socket_owners

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 99 1 0 20 4 30 10 -1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0 100 0 0 10 0
   1: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 556 1 0 100 0 0 10 0
"""


def test_proc_net_listeners_are_parsed() -> None:
    """Only LISTEN lines count (not the established one), with addresses in the kernel's
    host-order words turned into ordinary IPv4 and IPv6 text."""
    assert parse_proc_net(TCP) == [("127.0.0.1", 8080, 4242), ("0.0.0.0", 22, 77)]
    assert parse_proc_net(TCP6) == [("::1", 80, 555), ("::", 8081, 556)]
    assert parse_proc_net("header only\n") == []
    assert parse_proc_net("h\n garbage line that is long enough to split 1 2 3 4 5\n") == []


def test_socket_owner_is_found_in_its_namespace() -> None:
    """A socket this process listens on is found in /proc/net/tcp and owned by this
    process (its NSpid, here its pid); an inode nobody holds has no owner."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        found = [i for _, p, i in parse_proc_net(Path("/proc/net/tcp").read_text())
                 if p == port]
        assert len(found) == 1
        ns = Path("/proc/self/ns/net")
        assert socket_owners(ns, {found[0], 1}) == {found[0]: os.getpid()}
        assert socket_owners(Path("/no/such/netns"), {found[0]}) == {}


@pytest.mark.parametrize("message,target", [
    ('{"host": "localhost", "port": 5432}', Target("localhost", 5432)),
    ('{"port": 80}', Target("localhost", 80)),
    ('{"host": "", "port": "8080"}', Target("localhost", 8080)),
    ('{"host": "10.0.0.1", "port": 1}', Target("10.0.0.1", 1)),
    ('{"host": "[fdf::1]", "port": 65535}', Target("fdf::1", 65535)),
])
def test_proxy_first_message_accepted(message: str, target: Target) -> None:
    """What the Go and JS SDKs send, with the defaults and spellings the contract allows."""
    assert parse_target(message) == target


@pytest.mark.parametrize("message", [
    None, b'{"port": 80}', "", "nope", "[]", '{"port": 0}', '{"port": 65536}',
    '{"port": -1}', '{"port": 1.5}', '{"port": true}', '{"port": "80x"}',
    '{"port": "\\u0661"}', '{"host": "example.com", "port": 80}', '{"host": 1, "port": 80}',
    '{"host": "127.0.0.1:22", "port": 80}', "[" * 100000,
])
def test_proxy_first_message_refused(message: str | bytes | None) -> None:
    """Anything else is a `BadRequest` (never another exception: no 500)."""
    with pytest.raises(BadRequest):
        parse_target(message)


def test_pump_copies_both_ways_and_reports_who_ended() -> None:
    """Bytes go both ways; the target's EOF ends the pump as `target_closed`, the client's
    departure as `client_closed`, and either way the TCP connection is closed."""

    async def scenario(target_ends: bool) -> tuple[str, bytes, bytes]:
        got_by_target = bytearray()
        done = asyncio.Event()

        async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"hello client")
            await w.drain()
            if target_ends:
                w.close()
            else:
                while data := await r.read(1024):
                    got_by_target.extend(data)
            done.set()

        server = await asyncio.start_server(target, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1])
        to_client = bytearray()
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        await inbox.put(b"hello target")
        if not target_ends:
            await inbox.put(None)

        async def send(data: bytes) -> None:
            to_client.extend(data)

        ending = await asyncio.wait_for(pump(reader, writer, inbox.get, send), 10)
        await asyncio.wait_for(done.wait(), 10)
        assert writer.is_closing()
        server.close()
        await server.wait_closed()
        return ending, bytes(to_client), bytes(got_by_target)

    ending, to_client, _ = asyncio.run(scenario(target_ends=True))
    assert (ending, to_client) == ("target_closed", b"hello client")
    ending, _, to_target = asyncio.run(scenario(target_ends=False))
    assert (ending, to_target) == ("client_closed", b"hello target")


@pytest.mark.parametrize("text,mapping", [
    ("8080", Mapping(8080, "localhost", 8080)),
    ("0:80", Mapping(0, "localhost", 80)),
    ("5433:10.0.0.2:5432", Mapping(5433, "10.0.0.2", 5432)),
    ("9000:[::1]:90", Mapping(9000, "::1", 90)),
])
def test_cli_mappings(text: str, mapping: Mapping) -> None:
    """`wisp proxy`'s PORT, LOCAL:REMOTE and LOCAL:HOST:REMOTE forms."""
    assert parse_mapping(text) == mapping


@pytest.mark.parametrize("text", ["0", "x", "80:", ":80", "70000:80", "80:0", "1:h:p"])
def test_cli_mappings_refused(text: str) -> None:
    """A port out of range or not a number is refused (click shows it as a usage error)."""
    with pytest.raises(ValueError):
        parse_mapping(text)
