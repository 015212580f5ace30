"""The port proxy (`WS /proxy`, `wisp proxy`) and `WS /ports/watch` (contract §3.5, §3.6;
docs/proxy.md), driven by raw WebSocket clients, the `wisp` CLI and the JS SDK. What the
proxy must not reach is in tests/security/test_ports.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.framework.ports import open_ws, proxy, serve, sh, wait_listening, ws_url
from tests.framework.server import REPO, WispServer
from tests.functional.test_js_sdk import run_js

MiB = 1 << 20


def _send_all(ws, data: bytes, frame: int = MiB) -> None:  # type: ignore[no-untyped-def]
    view = memoryview(data)
    for i in range(0, len(view), frame):
        ws.send(bytes(view[i:i + frame]))


def _recv_bytes(ws, until: int | None = None) -> bytes:  # type: ignore[no-untyped-def]
    """Binary frames until `until` bytes came, or (None) until the server closes."""
    got = bytearray()
    try:
        while until is None or len(got) < until:
            message = ws.recv(timeout=120)
            assert isinstance(message, bytes), message
            got += message
    except ConnectionClosed:
        if until is not None:
            raise
    return bytes(got)


def test_proxy_carries_100_mb_both_ways_intact(server: WispServer, sprite) -> None:
    """100 MB of random bytes go to an echo server in the sprite while its echo comes back
    on the same socket: both directions at once, byte for byte (sha256), in frames of at
    most 32 KiB from the server. (An asyncio client: the synchronous websockets client
    can deadlock on a full-duplex stream, see `wisp.client.Client.open_proxy`.)"""
    serve(sprite, 9000, "cat")
    data = os.urandom(100 * MiB)

    async def run() -> tuple[dict, bytes, int]:  # type: ignore[type-arg]
        async with ws_connect(ws_url(server, sprite.name, "proxy"), max_size=None,
                              additional_headers=server.headers) as ws:
            await ws.send(json.dumps({"host": "localhost", "port": 9000}))
            reply = json.loads(await ws.recv())

            async def send() -> None:
                view = memoryview(data)
                for i in range(0, len(view), MiB):
                    await ws.send(bytes(view[i:i + MiB]))

            sender = asyncio.create_task(send())
            got = bytearray()
            biggest = 0
            while len(got) < len(data):
                message = await asyncio.wait_for(ws.recv(), 120)
                assert isinstance(message, bytes)
                biggest = max(biggest, len(message))
                got += message
            await sender
            return reply, bytes(got), biggest

    reply, got, biggest = asyncio.run(run())
    assert reply == {"status": "connected", "target": "127.0.0.1:9000"}
    assert len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert biggest <= 32 * 1024


def test_proxy_upload_then_target_eof_closes_1000(server: WispServer, sprite) -> None:
    """What the client sends arrives intact (the sprite hashes 20 MB); when the target
    closes its side after answering, the socket closes with 1000 after the answer."""
    size = 20 * MiB
    serve(sprite, 9001, f"sh -c 'head -c {size} | sha256sum'")
    data = os.urandom(size)
    ws, reply = proxy(server, sprite.name, "9001")  # a port as a string of digits works
    assert reply["status"] == "connected"
    _send_all(ws, data)
    answer = _recv_bytes(ws)
    assert answer.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert ws.close_code == 1000


def test_proxy_download_is_intact(server: WispServer, sprite) -> None:
    """A file the sprite serves arrives byte for byte, then the socket closes with 1000."""
    sh(sprite, "head -c 30000000 /dev/urandom > /dev/shm/blob")
    want = sh(sprite, "sha256sum /dev/shm/blob").split()[0]
    serve(sprite, 9002, "cat /dev/shm/blob")
    ws, reply = proxy(server, sprite.name, 9002, host="127.0.0.1")
    assert reply == {"status": "connected", "target": "127.0.0.1:9002"}
    got = _recv_bytes(ws)
    assert ws.close_code == 1000
    assert len(got) == 30000000 and hashlib.sha256(got).hexdigest() == want


def test_proxy_client_close_closes_the_target_connection(server: WispServer, sprite) -> None:
    """When the client closes the socket, the target sees EOF: it stores what came and
    exits."""
    serve(sprite, 9003, "sh -c 'cat > /dev/shm/got; echo done > /dev/shm/flag'")
    ws, reply = proxy(server, sprite.name, 9003, host="::1")
    assert reply == {"status": "connected", "target": "[::1]:9003"}
    ws.send(b"hello over the proxy")
    ws.close()
    deadline = time.monotonic() + 15
    while "done" not in sh(sprite, "cat /dev/shm/flag 2>/dev/null; true"):
        assert time.monotonic() < deadline, "the target never saw EOF"
        time.sleep(0.1)
    assert sh(sprite, "cat /dev/shm/got") == "hello over the proxy"


@pytest.mark.parametrize("first,error,code", [
    ("not json", "not valid JSON", 1008),
    ("[1]", "JSON object", 1008),
    ('{"host": "localhost"}', "port must be an integer", 1008),
    ('{"port": 0}', "out of range", 1008),
    ('{"port": 65536}', "out of range", 1008),
    ('{"port": true}', "port must be an integer", 1008),
    ('{"port": 80, "host": "example.com"}', "not localhost or an IP address", 1008),
    ('{"port": 80, "host": 7}', "host must be a string", 1008),
    (b"\x00binary", "JSON text frame", 1008),
    ('{"port": 1}', "dial tcp 127.0.0.1:1: connection refused", 1011),
])
def test_proxy_refuses_a_bad_first_message_or_a_closed_port(
        server: WispServer, sprite, first: str | bytes, error: str, code: int) -> None:
    """A bad first message or a port nothing listens on gets `{"status": "error"}` with a
    reason, then a close: 1008 for the client's mistake, 1011 for a failed dial."""
    ws = open_ws(server, sprite.name, "proxy")
    ws.send(first)
    reply = json.loads(ws.recv(timeout=30))
    assert reply["status"] == "error" and error in reply["error"], reply
    assert set(reply) == {"status", "error"}
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    assert ws.close_code == code


def test_proxy_and_watch_refuse_before_the_upgrade(server: WispServer, sprite) -> None:
    """A wrong token is a 401 and an unknown sprite a 404, as HTTP answers with the
    contract's error body, before any WebSocket exists."""
    for endpoint in ("proxy", "ports/watch"):
        with pytest.raises(InvalidStatus) as info:
            open_ws(server, sprite.name, endpoint, token="wrong")
        assert info.value.response.status_code == 401
        assert json.loads(info.value.response.body)["error"] == "unauthorized"
        with pytest.raises(InvalidStatus) as info:
            open_ws(server, "no-such-sprite", endpoint)
        assert info.value.response.status_code == 404
        assert json.loads(info.value.response.body)["error"] == "sprite_not_found"


def _event(ws) -> dict:  # type: ignore[no-untyped-def, type-arg]
    message = ws.recv(timeout=30)
    assert isinstance(message, str)
    return json.loads(message)  # type: ignore[no-any-return]


def test_ports_watch_sees_a_port_open_and_close(server: WispServer, sprite) -> None:
    """`port_list` first; then a listener started in the sprite is `port_opened` with its
    port, address and pid (as the sprite numbers it), and `port_closed` once killed."""
    sh(sprite, "setsid httpd -f -p 127.0.0.1:8123 </dev/null >/dev/null 2>&1 &")
    wait_listening(sprite, 8123)
    httpd = {"type": "port_opened", "port": 8123, "address": "127.0.0.1",
             "pid": int(sh(sprite, "pidof httpd"))}
    with open_ws(server, sprite.name, "ports/watch") as ws:
        first = _event(ws)
        assert first["type"] == "port_list"
        assert httpd in first["ports"]
        assert not any(p["port"] == 9100 for p in first["ports"])
        serve(sprite, 9100, "cat")
        opened = _event(ws)
        nc_pid = int(sh(sprite, "pidof nc"))
        assert opened == {"type": "port_opened", "port": 9100, "address": "::",
                          "pid": nc_pid}
        sh(sprite, f"kill {nc_pid}")
        assert _event(ws) == {**opened, "type": "port_closed"}
        sh(sprite, "killall httpd")
        assert _event(ws) == {**httpd, "type": "port_closed"}


def test_ports_watch_ends_when_the_sprite_is_deleted(server: WispServer, sprite_factory
                                                      ) -> None:
    """Deleting the watched sprite closes the watch with 1000."""
    s = sprite_factory()
    with open_ws(server, s.name, "ports/watch") as ws:
        assert _event(ws) == {"type": "port_list", "ports": []}
        server.api("DELETE", f"/v1/sprites/{s.name}")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        assert ws.close_code == 1000


def test_js_sdk_watch_ports_and_proxy_port(server: WispServer) -> None:
    """The unmodified JS SDK: `watchPorts` sees `port_list`, then a listener open (port
    and pid) and close; `proxyPort` carries 4 MiB to an echo server and back intact, and a
    proxy to a closed port drops the local connection (tests/js/ports.mjs)."""
    assert run_js(server, "ports.mjs")[-1] == "ok delete"


def _echo_through(port: int, data: bytes) -> bytes:
    """Send `data` to 127.0.0.1:port while reading its echo; the echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        sender = threading.Thread(target=conn.sendall, args=(data,))
        sender.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            got += chunk
        sender.join()
    return bytes(got)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_wisp_proxy_cli_forwards_100_mb_both_ways(server: WispServer, sprite,
                                                  tmp_path: Path) -> None:
    """`wisp proxy NAME 0:9000 9001` listens on 127.0.0.1 (a free port, and 9001 itself),
    prints each forwarding; 100 MB echoed through it arrive intact; a port nothing
    listens on drops the local connection and says why; SIGINT stops it with exit 0."""
    serve(sprite, 9000, "cat")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(WISP_API=server.url, WISP_TOKEN=server.token, PYTHONPATH=str(REPO),
               XDG_CONFIG_HOME=str(REPO / ".no-config"), PYTHONFAULTHANDLER="1")
    # stderr to a file, not a pipe nobody reads while it runs; on a hang SIGABRT makes
    # faulthandler write every thread's stack there, for the failure message
    errfile = tmp_path / "proxy.stderr"
    with open(errfile, "w") as errf:
        # SIGINT as a terminal's Ctrl-C finds it: a runner that started the suite in the
        # background (`cmd &` in a script) has SIGINT ignored, and a child inherits that
        proc = subprocess.Popen([sys.executable, "-m", "wisp.cli", "proxy", sprite.name,
                                 "0:9000", "0:127.0.0.1:9001"], env=env,
                                stdout=subprocess.PIPE, stderr=errf, text=True,
                                preexec_fn=_default_sigint)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        local = [int(line.split()[1].rsplit(":", 1)[1]) for line in lines]
        assert lines[0] == f"Forwarding 127.0.0.1:{local[0]} -> localhost:9000 in sprite " \
                           f"{sprite.name}\n"
        assert lines[1].endswith(f" -> 127.0.0.1:9001 in sprite {sprite.name}\n")
        data = os.urandom(100 * MiB)
        got = _echo_through(local[0], data)
        assert len(got) == len(data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        with socket.create_connection(("127.0.0.1", local[1]), timeout=30) as conn:
            try:
                assert conn.recv(10) == b""
            except ConnectionResetError:
                pass
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=10)
            raise AssertionError("wisp proxy ignored SIGINT for 30 s; its stacks:\n"
                                 + errfile.read_text()[-8000:]) from None
        err = errfile.read_text()
        assert code == 0, err
        assert len(err) < 4096, err[-4096:]  # a few lines, never a flood of warnings
        assert "127.0.0.1:9001: dial tcp 127.0.0.1:9001: connection refused" in err, err
        assert "Stopped." in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
