"""Every API call needs the bearer token; a missing or wrong one gets 401 and learns nothing."""

from __future__ import annotations

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import InvalidStatus

from tests.framework.server import WispServer

ENDPOINTS = [
    ("GET", "/v1/sprites"),
    ("POST", "/v1/sprites"),
    ("GET", "/v1/sprites/{name}"),
    ("GET", "/v1/sprites/no-such"),
    ("PUT", "/v1/sprites/{name}"),
    ("DELETE", "/v1/sprites/{name}"),
    ("POST", "/v1/sprites/{name}/upgrade"),
    ("POST", "/v1/sprites/{name}/fork"),
    ("GET", "/v1/sprites/{name}/exec"),
    ("POST", "/v1/sprites/{name}/exec"),
    ("POST", "/v1/sprites/{name}/checkpoint"),
    ("GET", "/v1/sprites/{name}/checkpoints"),
    ("GET", "/v1/sprites/{name}/checkpoints/v0"),
    ("DELETE", "/v1/sprites/{name}/checkpoints/v0"),
    ("POST", "/v1/sprites/{name}/checkpoints/v0/restore"),
    ("GET", "/v1/sprites/{name}/fs/list?path=/"),
    ("GET", "/v1/sprites/{name}/fs/read?path=/etc/passwd"),
    ("PUT", "/v1/sprites/{name}/fs/write?path=/tmp/x"),
    ("GET", "/v1/no-such-route"),
]


@pytest.mark.parametrize("method,path", ENDPOINTS)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Bearer test-tokenX", "Basic dGVzdA==",
                                  "bearer test-token", "Bearer  test-token"])
def test_rest_needs_token(server: WispServer, sprite, method: str, path: str,
                          auth: str | None) -> None:
    """Without the exact token every endpoint (existing sprite or not, real route or not)
    answers the same 401 body, and the sprite is untouched."""
    headers = {"Authorization": auth} if auth is not None else {}
    r = httpx.request(method, server.url + path.format(name=sprite.name), headers=headers,
                      json={"name": "intruder"}, timeout=30)
    assert r.status_code == 401
    assert r.json() == {"error": "unauthorized", "message": "missing or invalid bearer token"}
    assert server.api("GET", f"/v1/sprites/{sprite.name}").status_code == 200
    assert server.api("GET", "/v1/sprites/intruder").status_code == 404


@pytest.mark.parametrize("path", ["/v1/sprites/{name}/exec?cmd=id", "/v1/sprites/{name}/exec/1",
                                  "/v1/sprites/{name}/control"])
def test_websocket_needs_token(server: WispServer, sprite, path: str) -> None:
    """A WebSocket upgrade without the token is refused with 401 before any upgrade."""
    url = server.url.replace("http", "ws") + path.format(name=sprite.name)
    for headers in ({}, {"Authorization": "Bearer nope"}):
        with pytest.raises(InvalidStatus) as info:
            ws_client.connect(url, additional_headers=headers, open_timeout=10)
        assert info.value.response.status_code == 401
        assert b"unauthorized" in info.value.response.body
