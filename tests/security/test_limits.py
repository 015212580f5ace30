"""Slow and greedy clients: the header timeout, the idle keep-alive timeout and the
connection cap ([server] in the config, docs/security.md "Limits") close or refuse them,
while a silent exec WebSocket stays open and exec output is not compressed on the loop."""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets.sync.client as ws_client

from tests.framework.server import WispServer

HEADER_TIMEOUT = 1.0
KEEP_ALIVE_TIMEOUT = 1.0
SLACK = 3.0  # timers fire late on a loaded 2-CPU machine
CAP = 20


def _server(base: Path, name: str, server_toml: str) -> WispServer:
    cfg = base / f"{name}.toml"
    cfg.write_text(f"[server]\n{server_toml}\n")
    return WispServer(base / name, config_file=cfg)


@pytest.fixture(scope="module")
def strict(leak_check: Path) -> Iterator[WispServer]:
    """A server with one-second header and keep-alive timeouts."""
    srv = _server(leak_check, "limits", f"header_timeout = {HEADER_TIMEOUT}\n"
                                         f"keep_alive_timeout = {KEEP_ALIVE_TIMEOUT}\n")
    srv.start()
    yield srv
    srv.stop()


def _connect(srv: WispServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def _read_until_closed(socks: list[socket.socket], timeout: float,
                       start: float | None = None) -> dict[int, tuple[bytes, float]]:
    """Read every socket until the server closes it; index → (all bytes, seconds from
    `start` (default: now) to EOF). Sockets still open after `timeout` are left out."""
    sel = selectors.DefaultSelector()
    start = time.monotonic() if start is None else start
    got: dict[int, bytearray] = {}
    done: dict[int, tuple[bytes, float]] = {}
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        got[i] = bytearray()
    while len(done) < len(socks):
        left = start + timeout - time.monotonic()
        if left <= 0:
            break
        for key, _ in sel.select(left):
            i = key.data
            try:
                chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
            except ConnectionResetError:
                chunk = b""
            if chunk:
                got[i] += chunk
            else:
                done[i] = (bytes(got[i]), time.monotonic() - start)
                sel.unregister(key.fileobj)
    sel.close()
    return done


def _request(srv: WispServer, path: str = "/v1/sprites") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {srv.token}\r\n\r\n").encode()


def test_partial_request_heads_are_closed(strict: WispServer) -> None:
    """400 connections that send nothing or only part of a request head (slowloris) are all
    closed within header_timeout (+ slack): the silent ones without a reply, the partial
    ones after a 408 with the contract's error body. The server answers normally after."""
    opened = time.monotonic()
    socks = [_connect(strict) for _ in range(400)]
    for s in socks[::2]:
        s.sendall(_request(strict)[:-2])  # everything but the blank line that ends the head
    closed = _read_until_closed(socks, time.monotonic() - opened + HEADER_TIMEOUT + SLACK,
                                opened)
    for s in socks:
        s.close()
    assert len(closed) == 400, f"{400 - len(closed)} of 400 still open"
    for i, (data, _) in closed.items():
        if i % 2:
            assert data == b""
        else:
            assert data.startswith(b"HTTP/1.1 408 "), data[:200]
            assert data.endswith(b'{"error": "request_timeout", "message": "no complete '
                                 b'request head within 1 s"}'), data[-200:]
    assert min(t for _, t in closed.values()) >= HEADER_TIMEOUT * 0.8
    assert strict.api("GET", "/v1/sprites").status_code == 200


def test_idle_keep_alive_is_closed(strict: WispServer) -> None:
    """After a response, a kept-alive connection that stays silent is closed after
    keep_alive_timeout, and one that starts its next request but never finishes the head
    is closed header_timeout after that first byte."""
    idle, slow = _connect(strict), _connect(strict)
    for s in (idle, slow):
        s.sendall(_request(strict))
        with s.makefile("rb") as f:  # read the whole response
            assert f.readline().startswith(b"HTTP/1.1 200 ")
            length = next(int(line.split(b":")[1]) for line in iter(f.readline, b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            f.read(length)
    slow.sendall(b"GET /v1/sprites HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    closed = _read_until_closed([idle, slow], max(HEADER_TIMEOUT, KEEP_ALIVE_TIMEOUT) + SLACK)
    idle.close()
    slow.close()
    assert set(closed) == {0, 1}, "a kept-alive connection is still open"
    assert closed[0][0] == b""
    assert closed[1][0].startswith(b"HTTP/1.1 408 ")


def test_connection_cap_refuses_cleanly(leak_check: Path) -> None:
    """With max_connections open, one more connection is answered 503 with the contract's
    error body at once and closed, even before it sends anything (a flood of idle sockets
    cannot pile up); once connections close, the server answers normally again."""
    srv = _server(leak_check, "limits-cap", f"max_connections = {CAP}\nheader_timeout = 30")
    srv.start()
    try:
        held = [_connect(srv) for _ in range(CAP + 10)]
        # the server has accepted them in order: the first CAP (less any connection of its
        # own readiness check still open) are held, the rest are refused at once
        closed = _read_until_closed(held, 3.0)
        refused = sorted(closed)
        assert 10 <= len(refused) <= 12, f"{len(refused)} refused of {CAP + 10}"
        assert refused == list(range(CAP + 10 - len(refused), CAP + 10))
        for data, _ in closed.values():
            assert data.startswith(b"HTTP/1.1 503 "), data[:200]
            assert data.endswith(b'{"error": "too_many_connections", "message": "the server '
                                 b'has 20 connections open; retry later"}')
        r = httpx.get(srv.url + "/v1/sprites", headers=srv.headers, timeout=10)
        assert r.status_code == 503
        assert r.json()["error"] == "too_many_connections"
        for s in held:
            s.close()
        deadline = time.monotonic() + 5
        while True:  # the server sees the closes a moment later
            r = httpx.get(srv.url + "/v1/sprites", headers=srv.headers, timeout=10)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def strict_sprite(strict: WispServer) -> Iterator[str]:
    name = "limits-ws"
    strict.api("POST", "/v1/sprites", json={"name": name}).raise_for_status()
    yield name
    strict.api("DELETE", f"/v1/sprites/{name}")


def _exec_url(srv: WispServer, sprite: str, *cmd: str) -> str:
    query = "&".join([f"cmd={c}" for c in cmd] + ["stdin=false"])
    return srv.url.replace("http", "ws") + f"/v1/sprites/{sprite}/exec?{query}"


def test_silent_exec_websocket_stays_open(strict: WispServer, strict_sprite: str) -> None:
    """An exec WebSocket whose command prints nothing for 10 s (ten times the header and
    keep-alive timeouts) is not cut: the command runs to its end and its exit arrives."""
    start = time.monotonic()
    exit_frame = None
    with ws_client.connect(_exec_url(strict, strict_sprite, "sleep", "10"),
                           additional_headers=strict.headers, open_timeout=30) as ws:
        for msg in ws:
            if isinstance(msg, bytes) and msg[:1] == b"\x03":
                exit_frame = msg
                break
    assert exit_frame == b"\x03\x00"
    assert time.monotonic() - start >= 10


def test_exec_declines_permessage_deflate(strict: WispServer, strict_sprite: str) -> None:
    """The `websockets` client offers permessage-deflate by default (as sprites-py does);
    the server declines it, so exec output is never compressed on the event loop (the
    contract makes accepting it optional). Throughput: `make bench`."""
    with ws_client.connect(_exec_url(strict, strict_sprite, "echo", "hi"),
                           additional_headers=strict.headers, open_timeout=30) as ws:
        assert ws.request is not None and ws.response is not None
        assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        out = b""
        for msg in ws:
            if isinstance(msg, bytes) and msg[:1] == b"\x01":
                out += msg[1:]
            elif isinstance(msg, bytes) and msg[:1] == b"\x03":
                break
    assert out == b"hi\n"
