"""Bad input gets the contract's error bodies and a 4xx, never a 500 or a traceback."""

from __future__ import annotations

import pytest

from tests.framework.server import WispServer


@pytest.mark.parametrize("name", ["", "UPPER", "-dash", "a" * 64, "sp ace", "x/y", "dot.s", 7])
def test_invalid_names_are_400(server: WispServer, name: object) -> None:
    """Names outside ^[a-z0-9][a-z0-9-]{0,62}$ are refused with invalid_name."""
    r = server.api("POST", "/v1/sprites", json={"name": name})
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
        "Content-Type": content, "Authorization": f"Bearer {server.token}"})
    assert r.status_code == 400, r.text
    assert r.json()["message"]
    assert server.api("GET", "/v1/sprites/ok-name").status_code == 404


def test_oversized_body_is_413(server: WispServer) -> None:
    """A body over 1 MiB is refused before it is parsed."""
    r = server.api("POST", "/v1/sprites", content=b"{" + b" " * (2 << 20) + b"}")
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_bad_query_values_are_400(server: WispServer) -> None:
    """A non-integer max_results or a forged continuation token is 400; a huge one clamps."""
    assert server.api("GET", "/v1/sprites", params={"max_results": "ten"}).status_code == 400
    r = server.api("GET", "/v1/sprites", params={"continuation_token": "%%%"})
    assert r.status_code == 400
    assert server.api("GET", "/v1/sprites", params={"max_results": "-5"}).status_code == 200


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
    r = server.api("GET", "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert r.headers["sprite-version"]
    r = server.api("PATCH", "/v1/sprites")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
