"""Helpers for the port proxy and ports/watch tests: raw WebSocket clients of both
endpoints, and TCP servers started in a sprite with busybox `nc`."""

from __future__ import annotations

import json
import time
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.framework.server import WispServer


def ws_url(server: WispServer, sprite: str, endpoint: str) -> str:
    return f"ws{server.url[len('http'):]}/v1/sprites/{sprite}/{endpoint}"


def open_ws(server: WispServer, sprite: str, endpoint: str,
            token: str | None = None) -> ClientConnection:
    return connect(ws_url(server, sprite, endpoint), max_size=None, open_timeout=60, legacy=True,
                   close_timeout=5,
                   additional_headers={"Authorization": f"Bearer {token or server.token}"})


def proxy(server: WispServer, sprite: str, port: int | str, host: str | None = "localhost"
          ) -> tuple[ClientConnection, dict[str, Any]]:
    """A proxy socket after its first exchange: (socket, the server's reply)."""
    ws = open_ws(server, sprite, "proxy")
    init: dict[str, Any] = {"port": port}
    if host is not None:
        init["host"] = host
    ws.send(json.dumps(init))
    reply = ws.recv(timeout=30)
    assert isinstance(reply, str), reply
    return ws, json.loads(reply)


def sh(sprite, script: str) -> str:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output().decode()


def serve(sprite, port: int, program: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    """Start `nc -l -p PORT -e PROGRAM` in the sprite (it listens on `::`, takes one
    connection, runs PROGRAM on it and exits) and return once it listens."""
    sh(sprite, f"setsid nc -l -p {port} -e {program} </dev/null >/dev/null 2>&1 &")
    wait_listening(sprite, port, timeout)


def wait_listening(sprite, port: int, timeout: float = 30,  # type: ignore[no-untyped-def]
                   present: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = sh(sprite, "netstat -ltn")
        if any(line.split()[3].endswith(f":{port}") for line in out.splitlines()
               if line.startswith("tcp")) == present:
            return
        time.sleep(0.05)
    raise AssertionError(f"port {port} {'never' if present else 'still'} listening")
