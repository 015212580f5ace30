"""The port proxy and ports/watch see only the sprite they name: `/proxy` dials from
inside that sprite's network namespace, so `localhost` is its own loopback, never the
host's (where the Wisp API listens) nor another sprite's; ports/watch reports only that
sprite's sockets. Each target exists and answers (checked from the host, or through the
sprite that owns it): only the namespace stops the proxy."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.framework.ports import open_ws, proxy, serve
from tests.framework.server import WispServer


@pytest.fixture
def host_service() -> Iterator[int]:
    """A TCP service of the host on every address (0.0.0.0), answering "host"."""
    srv = socket.create_server(("0.0.0.0", 0))
    port = srv.getsockname()[1]
    done = threading.Event()

    def run() -> None:
        srv.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"host")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield port
    done.set()
    thread.join()
    srv.close()


def _host_addresses() -> list[str]:
    """The host's own global IPv4 addresses (its interfaces')."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def _refused(server: WispServer, sprite: str, host: str, port: int) -> str:
    """The proxy's error for host:port from `sprite` (fails the test if it connected)."""
    ws, reply = proxy(server, sprite, port, host=host)
    ws.close()
    assert reply["status"] == "error", (host, port, reply)
    return str(reply["error"])


def test_proxy_cannot_reach_the_host(server: WispServer, sprite, host_service: int) -> None:
    """The Wisp API (host 127.0.0.1) and a host service on 0.0.0.0 answer on the host, but
    the proxy's localhost, 127.0.0.1, ::1 and the host's own addresses lead elsewhere."""
    with socket.create_connection(("127.0.0.1", host_service), timeout=5) as conn:
        assert conn.recv(4) == b"host"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    errors = []
    for port in (server.port, host_service):
        for host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", *_host_addresses()):
            errors.append(_refused(server, sprite.name, host, port))
    assert any("connection refused" in e for e in errors)
    for e in errors:  # the dial's own words: no host path, no traceback
        assert e.startswith("dial tcp ") and "/" not in e and "Traceback" not in e, e


def test_proxy_cannot_reach_another_sprites_loopback(server: WispServer, sprite_factory
                                                     ) -> None:
    """B listens on its loopback; B's own proxy reaches it, A's proxy to the same
    address and port is refused."""
    a, b = sprite_factory("pa"), sprite_factory("pb")
    serve(b, 9400, "echo from-b")
    assert "connection refused" in _refused(server, a.name, "127.0.0.1", 9400)
    ws, reply = proxy(server, b.name, 9400)
    with ws:
        assert reply["status"] == "connected"
        assert ws.recv(timeout=30) == b"from-b\n"


def test_ports_watch_shows_only_the_sprites_own_ports(server: WispServer, sprite_factory,
                                                      host_service: int) -> None:
    """A's port list names neither the host's listening ports (the Wisp API, a service on
    0.0.0.0) nor B's; B's list names B's port (the watch does see listeners)."""
    a, b = sprite_factory("wa"), sprite_factory("wb")
    serve(b, 9401, "cat")
    seen = {}
    for s in (a, b):
        with open_ws(server, s.name, "ports/watch") as ws:
            first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "port_list"
        seen[s.name] = {p["port"] for p in first["ports"]}
    assert 9401 in seen[b.name]
    assert not seen[a.name] & {9401, server.port, host_service}, seen
