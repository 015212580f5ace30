"""Sprites CRUD through the official sprites-py SDK and raw HTTP (contract §2.1-§2.7)."""

from __future__ import annotations

import pytest
from sprites import ListOptions, NotFoundError, URLSettings

from tests.framework.server import WispServer


def test_create_get_list_delete(client, server: WispServer, sprite_factory) -> None:
    """A created sprite is returned by get and list (with prefix), and gone after delete."""
    sprite = sprite_factory("crud", labels=["prod", "sdk"])
    got = client.get_sprite(sprite.name)
    assert got.name == sprite.name
    raw = server.api("GET", f"/v1/sprites/{sprite.name}").json()
    assert raw["id"].startswith("sprite-")
    assert raw["labels"] == ["prod", "sdk"]
    assert raw["status"] in ("cold", "running")
    assert raw["created_at"].endswith("Z") and len(raw["created_at"]) == 20
    names = [s.name for s in client.list_sprites(ListOptions(prefix="crud-")).sprites]
    assert sprite.name in names
    assert all(n.startswith("crud-") for n in names)
    client.delete_sprite(sprite.name)
    with pytest.raises(NotFoundError):
        client.get_sprite(sprite.name)
    assert server.api("GET", f"/v1/sprites/{sprite.name}").status_code == 404


def test_list_pagination_and_counts(client, server: WispServer, sprite_factory) -> None:
    """max_results pages through every sprite with continuation tokens; counts are given
    both at top level (Py/JS) and in `org` (Go)."""
    made = {sprite_factory("page").name for _ in range(3)}
    seen: list[str] = []
    token = None
    while True:
        page = client.list_sprites(ListOptions(prefix="page-", max_results=1,
                                               continuation_token=token))
        seen += [s.name for s in page.sprites]
        if not page.has_more:
            break
        assert page.next_continuation_token
        token = page.next_continuation_token
    assert made <= set(seen) and len(seen) == len(set(seen))
    body = server.api("GET", "/v1/sprites", params={"max_results": "100000"}).json()
    for key in ("running", "warm", "cold"):
        assert isinstance(body[key], int) and body["org"][key] == body[key]
    assert "next_continuation_token" not in body or body["has_more"]


def test_update_labels_and_url_settings(client, server: WispServer, sprite_factory) -> None:
    """PUT replaces labels, clear_labels empties them, url_settings are stored and echoed."""
    sprite = sprite_factory("upd")
    client.update_sprite(sprite.name, labels=["a", "b"])
    assert server.api("GET", f"/v1/sprites/{sprite.name}").json()["labels"] == ["a", "b"]
    client.update_url_settings(sprite.name, URLSettings(auth="public"))
    body = server.api("GET", f"/v1/sprites/{sprite.name}").json()
    assert body["url_settings"]["auth"] == "public"
    r = server.api("PUT", f"/v1/sprites/{sprite.name}", json={"clear_labels": True})
    assert r.status_code == 200 and r.json()["labels"] == []
    r = server.api("PUT", f"/v1/sprites/{sprite.name}", json={"url_settings": {"auth": "x"}},
                   validate_request=False)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"


def test_exec_quickstart(sprite) -> None:
    """The SDK quickstart: a command's output comes back exactly."""
    out = sprite.command("echo", "hello", "world").output()
    assert out == b"hello world\n"


def test_hostname_and_home(sprite) -> None:
    """The sprite's hostname is its name (also for sprites handed out from the warm pool,
    which are named after boot) and resolves; commands start in /home/sprite as `sprite`."""
    assert sprite.command("hostname").output().decode().strip() == sprite.name
    assert f"127.0.1.1\t{sprite.name}\n".encode() in sprite.command("cat", "/etc/hosts").output()
    assert sprite.command("pwd").output() == b"/home/sprite\n"
    assert sprite.command("id", "-un").output() == b"sprite\n"


def test_upgrade_keeps_disk(client, server: WispServer, sprite_factory) -> None:
    """Upgrade moves the sprite onto the newest build of its base image and keeps its files."""
    from tests.framework.server import IMAGES_DIR
    from wisp.images import ImageStore

    sprite = sprite_factory("upg")
    sprite.command("sh", "-c", "echo kept > /home/sprite/mark").output()
    before = server.api("GET", f"/v1/sprites/{sprite.name}").json()["image"]
    store = ImageStore(IMAGES_DIR)
    newer = store.build_busybox("busybox")
    try:
        client.upgrade_sprite(sprite.name)
        after = server.api("GET", f"/v1/sprites/{sprite.name}").json()["image"]
        assert after == f"busybox@{newer.version}" and after != before
        assert sprite.command("cat", "/home/sprite/mark").output() == b"kept\n"
    finally:
        client.delete_sprite(sprite.name)
        store.remove("busybox", newer.version)


def test_environment_applies_to_exec(server: WispServer, client) -> None:
    """The `environment` given at create is in every exec's environment; a request's env
    overrides it."""
    name = "envtest-1"
    r = server.api("POST", "/v1/sprites", json={"name": name, "environment": {"APP_MODE": "dev",
                                                                              "X": "1"}})
    assert r.status_code == 201 and r.json()["environment"] == {"APP_MODE": "dev", "X": "1"}
    try:
        s = client.sprite(name)
        out = s.command("sh", "-c", "echo $APP_MODE $X", env={"X": "2"}).output()
        assert out == b"dev 2\n"
    finally:
        server.api("DELETE", f"/v1/sprites/{name}")
