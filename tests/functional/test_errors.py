"""Bad input gets the contract's error bodies and a 4xx, never a 500 or a traceback."""

from __future__ import annotations

import pytest

from tests.framework.server import WispServer


@pytest.mark.parametrize("name", ["", "UPPER", "-dash", "a" * 64, "sp ace", "x/y", "dot.s", 7])
def test_invalid_names_are_400(server: WispServer, name: object) -> None:
    """Names outside ^[a-z0-9][a-z0-9-]{0,62}$ are refused with invalid_name."""
    r = server.api("POST", "/v1/sprites", json={"name": name}, validate_request=False)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_name"


def test_duplicate_name_is_400(server: WispServer, sprite_factory) -> None:
    """Creating a sprite whose name is taken answers 400 (as the Sprites docs say)."""
    sprite = sprite_factory("dup")
    r = server.api("POST", "/v1/sprites", json={"name": sprite.name})
    assert r.status_code == 400 and r.json()["error"] == "sprite_exists"


@pytest.mark.parametrize("body,content", [
    (b"{not json", "application/json"),
    (b"[1,2]", "application/json"),
    (b'{"name": "ok-name", "labels": "nope"}', "application/json"),
    (b'{"name": "ok-name", "labels": [1]}', "application/json"),
    (b'{"labels": []}', "application/json"),
    (b'{"name": "ok-name", "environment": {"A": 1}}', "application/json"),
])
def test_malformed_bodies_are_400(server: WispServer, body: bytes, content: str) -> None:
    """Malformed JSON, wrong types and missing names are 400 with a message."""
    r = server.api("POST", "/v1/sprites", content=body, headers={
        "Content-Type": content, "Authorization": f"Bearer {server.token}"},
        validate_request=False)
    assert r.status_code == 400, r.text
    assert r.json()["message"]
    assert server.api("GET", "/v1/sprites/ok-name").status_code == 404


def test_oversized_body_is_413(server: WispServer) -> None:
    """A body over 1 MiB is refused before it is parsed."""
    r = server.api("POST", "/v1/sprites", content=b"{" + b" " * (2 << 20) + b"}",
                   headers={"Content-Type": "application/json"}, validate_request=False)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_bad_query_values_are_400(server: WispServer) -> None:
    """A non-integer max_results or a forged continuation token is 400; a huge one clamps."""
    assert server.api("GET", "/v1/sprites", params={"max_results": "ten"},
                      validate_request=False).status_code == 400
    r = server.api("GET", "/v1/sprites", params={"continuation_token": "%%%"},
                   validate_request=False)
    assert r.status_code == 400
    assert server.api("GET", "/v1/sprites", params={"max_results": "-5"},
                      validate_request=False).status_code == 200


def test_unknown_sprite_and_checkpoint_are_404(server: WispServer, sprite_factory) -> None:
    """Unknown sprites and checkpoints answer 404 with their own error codes."""
    r = server.api("GET", "/v1/sprites/no-such-sprite")
    assert r.status_code == 404
    assert r.json() == {"error": "sprite_not_found", "message": "sprite 'no-such-sprite' not found"}
    for method, path in [("DELETE", "/v1/sprites/no-such-sprite"),
                         ("PUT", "/v1/sprites/no-such-sprite"),
                         ("POST", "/v1/sprites/no-such-sprite/checkpoint"),
                         ("GET", "/v1/sprites/no-such-sprite/checkpoints")]:
        assert server.api(method, path, json={"labels": []}).status_code == 404, path
    sprite = sprite_factory("nocp")
    r = server.api("GET", f"/v1/sprites/{sprite.name}/checkpoints/v99")
    assert r.status_code == 404 and r.json()["error"] == "checkpoint_not_found"
    r = server.api("POST", f"/v1/sprites/{sprite.name}/checkpoints/v99/restore")
    assert r.status_code == 404


def test_unknown_route_is_contract_404(server: WispServer) -> None:
    """Unknown endpoints get a JSON error body too, and every response has Sprite-Version."""
    r = server.api("GET", "/v1/nothing-here", validate_request=False)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert r.headers["sprite-version"]
    r = server.api("PATCH", "/v1/sprites", validate_request=False)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_refused_websocket_carries_sprite_version(server: WispServer) -> None:
    """A WebSocket handshake refused for a reason other than auth (an unknown sprite) still
    carries `Sprite-Version` (the Go SDK reads it from any response) and the JSON body."""
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    url = server.url.replace("http", "ws") + "/v1/sprites/no-such-sprite/exec?cmd=true"
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(url, additional_headers=server.headers).close()
    response = refused.value.response
    assert response.status_code == 404 and response.headers["sprite-version"]
    assert b"sprite_not_found" in response.body


def test_encoded_slash_names_nothing(server: WispServer, sprite_factory) -> None:
    """Path segments are split before they are decoded (contract §0.1 rule 1): a "sprite
    name" `NAME%2Fcheckpoints%2Fv1` is a 404 and does not reach checkpoint v1 of NAME."""
    s = sprite_factory("slash")
    list(s.create_checkpoint())
    for method in ("DELETE", "GET", "PUT"):
        r = server.api(method, f"/v1/sprites/{s.name}%2Fcheckpoints%2Fv1",
                       validate_request=False)
        assert r.status_code == 404 and r.json()["error"] == "not_found", (method, r.text)
    r = server.api("GET", f"/v1/sprites/{s.name}%2ffs%2flist", params={"path": "/"},
                   validate_request=False)
    assert r.status_code == 404
    assert [cp.id for cp in s.list_checkpoints()] == ["v1", "v0"]


DEEP = b"[" * 1200 + b"]" * 1200  # 2.4 KB, deeper than the decoder's recursion limit


def _keepalive_pair(server: WispServer, method: str, path: str, body: bytes) -> tuple[int, bytes, int]:
    """Send `method path` with `body` and then `GET /v1/sprites` on one TCP connection;
    return (first status, first body, second status). The second reply proves the server
    kept the connection open after answering the first."""
    import socket

    def request(m: str, p: str, b: bytes) -> bytes:
        return (f"{m} {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n"
                ).encode() + b

    def read_reply(f) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
        status = int(f.readline().split()[1])
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return status, f.read(length)

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        f = s.makefile("rb")
        s.sendall(request(method, path, body))
        first, first_body = read_reply(f)
        s.sendall(request("GET", "/v1/sprites", b""))
        second, _ = read_reply(f)
    return first, first_body, second


def test_deeply_nested_json_is_400_and_keeps_the_connection(server: WispServer,
                                                            sprite_factory) -> None:
    """JSON nested 1,200 levels deep (a 2.4 KB body) is a 400 with the contract's body on
    every endpoint that reads a JSON body (fs endpoints: EINVAL in the fs shape), carries
    no Python error text, and the keep-alive connection stays usable."""
    import json

    name = sprite_factory("deep").name
    plain = [("POST", "/v1/sprites"), ("PUT", f"/v1/sprites/{name}"),
             ("POST", f"/v1/sprites/{name}/checkpoint"), ("POST", f"/v1/sprites/{name}/fork"),
             ("POST", f"/v1/sprites/{name}/exec/1/kill")]
    fs = [("POST", f"/v1/sprites/{name}/fs/rename"), ("POST", f"/v1/sprites/{name}/fs/chmod"),
          ("DELETE", f"/v1/sprites/{name}/fs/delete")]
    for method, path in plain + fs:
        status, body, after = _keepalive_pair(server, method, path, DEEP)
        assert status == 400, (method, path, status, body)
        reply = json.loads(body)
        if (method, path) in fs:
            assert reply["code"] == "EINVAL", reply
        else:
            assert reply["error"] == "bad_request", reply
        assert "Recursion" not in body.decode() and "Traceback" not in body.decode()
        assert after == 200, f"{method} {path}: connection not usable after the 400"


def test_empty_program_name_is_400(server: WispServer, sprite_factory) -> None:
    """`?path=&cmd=` names no program: HTTP exec answers 400 and the WebSocket exec is
    refused with a 400 before the upgrade, not a 500 from the init agent."""
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    name = sprite_factory("empty-cmd").name
    r = server.api("POST", f"/v1/sprites/{name}/exec?path=&cmd=", validate_request=False)
    assert r.status_code == 400 and r.json()["error"] == "bad_request", r.text
    url = server.url.replace("http", "ws") + f"/v1/sprites/{name}/exec?path=&cmd="
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(url, additional_headers=server.headers).close()
    assert refused.value.response.status_code == 400


@pytest.mark.parametrize("name", ["probe-nl\n", "probe-nl\r\n", "\nprobe-nl", "probe\x00nl"])
def test_names_with_control_characters_are_400(server: WispServer, name: str) -> None:
    """A name that is a valid name plus a newline (a `$`-anchored match accepts it) or any
    control character is refused: it would reach the sprite's URL and /etc/hosts."""
    r = server.api("POST", "/v1/sprites", json={"name": name}, validate_request=False)
    assert r.status_code == 400 and r.json()["error"] == "invalid_name", r.text
    assert all(s["name"].strip() == s["name"] for s in server.api(
        "GET", "/v1/sprites").json()["sprites"])
