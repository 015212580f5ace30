"""Sprite URLs (docs/urls.md): `http://NAME.localhost:<port>/` reaches port 8080 in the
sprite, through the real server and the official SDK, with both auth modes, the one-time
link, WebSockets, another port, waking a cold sprite and the 502 page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import websockets.sync.client as ws_client
from sprites import SpritesClient
from sprites.types import URLSettings
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import URL_WAKE_TIMEOUT
from tests.framework.server import REPO, WispServer
from tests.framework.urls import (
    ECHO_APP,
    WS_ECHO_APP,
    host,
    loopback_socket,
    sh,
    start_app,
    start_http_server,
    url_get,
)

pytestmark = pytest.mark.debian


def test_sprite_json_carries_its_url(url_server: WispServer, url_sprites) -> None:
    """Create, get and list all give `url` = http://NAME.localhost:<port>, auth "sprite"."""
    s = url_sprites()
    expected = f"http://{s.name}.localhost:{url_server.port}"
    got = url_server.api("GET", f"/v1/sprites/{s.name}").json()
    assert got["url"] == expected
    assert got["url_settings"]["auth"] == "sprite"
    listed = url_server.api("GET", f"/v1/sprites?prefix={s.name}").json()["sprites"]
    assert [x["url"] for x in listed] == [expected]


def test_http_server_needs_the_token(url_server: WispServer, url_sprites) -> None:
    """`python3 -m http.server 8080` in the sprite: 401 page without the token, its page
    with `Authorization: Bearer`."""
    s = url_sprites()
    start_http_server(s)
    r = url_get(url_server, host(url_server, s.name), "/index.html")
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("text/html")
    assert "hello from" not in r.text
    r = url_get(url_server, host(url_server, s.name), "/index.html", token=url_server.token)
    assert r.status_code == 200, r.text
    assert r.text == f"hello from {s.name}\n"
    # the sprite's own answers pass as they are, errors included
    r = url_get(url_server, host(url_server, s.name), "/missing", token=url_server.token)
    assert r.status_code == 404 and "File not found" in r.text


def test_one_time_link_sets_a_cookie_once(url_server: WispServer, url_sprites) -> None:
    """The link endpoint's URL sets an HttpOnly SameSite=Lax cookie and redirects to the
    same URL without the token; the cookie alone then works; the link works only once."""
    s = url_sprites()
    start_http_server(s)
    made = url_server.api("POST", f"/v1/sprites/{s.name}/url/link",
                          json={"path": "/index.html?x=1"})
    assert made.status_code == 201
    link = httpx.URL(made.json()["url"])
    assert link.host == f"{s.name}.localhost" and link.port == url_server.port
    assert link.path == "/index.html" and link.params["x"] == "1"
    target = link.raw_path.decode()
    r = url_get(url_server, host(url_server, s.name), target)
    assert r.status_code == 302, r.text
    assert r.headers["location"] == "/index.html?x=1"
    set_cookie = r.headers["set-cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")}
    assert {"httponly", "samesite", "path"} <= attrs and "samesite=lax" in set_cookie.lower()
    assert url_server.token not in set_cookie
    cookie = set_cookie.split(";", 1)[0]
    r = url_get(url_server, host(url_server, s.name), "/index.html", cookie=cookie)
    assert r.status_code == 200 and r.text == f"hello from {s.name}\n"
    again = url_get(url_server, host(url_server, s.name), target)
    assert again.status_code == 401 and "set-cookie" not in again.headers


def test_public_sprite_needs_no_token(url_server: WispServer, url_sprites) -> None:
    """`url_settings.auth = "public"` set through sprites-py's update: anyone gets the
    page; back to "sprite": 401 again."""
    s = url_sprites()
    start_http_server(s)
    assert url_get(url_server, host(url_server, s.name), "/index.html").status_code == 401
    updated = s.update(url_settings=URLSettings(auth="public"))
    assert updated.url_settings is not None and updated.url_settings.auth == "public"
    r = url_get(url_server, host(url_server, s.name), "/index.html")
    assert r.status_code == 200 and r.text == f"hello from {s.name}\n"
    s.update(url_settings=URLSettings(auth="sprite"))
    assert url_get(url_server, host(url_server, s.name), "/index.html").status_code == 401


def test_public_at_create(url_server: WispServer, url_sprites) -> None:
    """A sprite created public through the SDK serves without a token from the start."""
    s = url_sprites(url_settings=URLSettings(auth="public"))
    start_http_server(s)
    r = url_get(url_server, host(url_server, s.name), "/index.html")
    assert r.status_code == 200 and r.text == f"hello from {s.name}\n"


def test_another_port_by_host_form(url_server: WispServer, url_sprites) -> None:
    """`3000--NAME.localhost` reaches port 3000 in the sprite, with the same auth, while
    the plain host still reaches 8080."""
    s = url_sprites()
    start_http_server(s, 8080, "/tmp/www8080")
    sh(s, "mkdir -p /tmp/www3000 && echo three-thousand > /tmp/www3000/index.html")
    code, out = sh(s, "cd /tmp/www3000 && setsid python3 -m http.server 3000 --bind 127.0.0.1 "
                      "</dev/null >/dev/null 2>&1 &")
    assert code == 0, out
    h3000 = host(url_server, s.name, 3000)
    assert url_get(url_server, h3000, "/index.html").status_code == 401
    r = url_get(url_server, h3000, "/index.html", token=url_server.token)
    assert r.status_code == 200 and r.text == "three-thousand\n"
    r = url_get(url_server, host(url_server, s.name), "/index.html", token=url_server.token)
    assert r.text == f"hello from {s.name}\n"
    # a link for that port opens that host
    made = url_server.api("POST", f"/v1/sprites/{s.name}/url/link", json={"port": 3000})
    assert httpx.URL(made.json()["url"]).host == f"3000--{s.name}.localhost"


def test_bodies_stream_both_ways(url_server: WispServer, url_sprites) -> None:
    """A 20 MB upload (fixed length and chunked) and a 20 MB chunked download pass whole,
    with method, path and query as sent."""
    s = url_sprites()
    start_app(s, ECHO_APP, 8080, "echo")
    h = host(url_server, s.name)
    big = os.urandom(20 << 20)
    r = url_get(url_server, h, "/up?a=1&b=%2F", method="POST", content=big,
                token=url_server.token)
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["method"], got["path"], got["body_len"]) == ("POST", "/up?a=1&b=%2F", len(big))

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    r = url_get(url_server, h, "/chunked", method="PUT", content=chunks(),
                token=url_server.token)
    assert r.json()["body_len"] == len(big)
    r = url_get(url_server, h, "/stream?n=320", token=url_server.token)
    assert r.status_code == 200 and len(r.content) == 320 * 65536


def test_websocket_echo(url_server: WispServer, url_sprites) -> None:
    """A WebSocket through the URL: the sprite's greeting, text and binary echoed as such
    (a 1 MB message too), and the sprite's close code reaches the client."""
    s = url_sprites()
    start_app(s, WS_ECHO_APP, 8080, "ws")
    url = f"ws://{host(url_server, s.name)}/chat?room=1"
    with pytest.raises(InvalidStatus) as refused:  # no token: the handshake is refused
        ws_client.connect(url, sock=loopback_socket(url_server), open_timeout=30)
    assert refused.value.response.status_code == 401
    auth = {"Authorization": f"Bearer {url_server.token}"}
    with ws_client.connect(url, sock=loopback_socket(url_server), additional_headers=auth,
                           open_timeout=30, max_size=None) as ws:
        assert ws.recv(timeout=30) == "hello /chat?room=1"
        ws.send("ping text")
        assert ws.recv(timeout=30) == "ping text"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=30) == b"\x00\x01binary"
        blob = os.urandom(1 << 20)
        ws.send(blob)
        assert ws.recv(timeout=30) == blob
        ws.send("close:4001")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        assert ws.close_code == 4001


def _request_that_wakes(url_server: WispServer, name: str, sprite) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """A URL request to a cold sprite, from another thread: once the request has woken it,
    start its HTTP server (the request is held meanwhile); the request's status and text."""
    result: dict[str, object] = {}

    def request() -> None:
        r = url_get(url_server, host(url_server, name), "/index.html", token=url_server.token)
        result.update(status=r.status_code, text=r.text)

    waiter = threading.Thread(target=request)
    waiter.start()
    deadline = time.monotonic() + URL_WAKE_TIMEOUT
    while url_server.api("GET", f"/v1/sprites/{name}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the URL request did not wake the sprite"
        time.sleep(0.05)
    start_http_server(sprite)
    waiter.join(60)
    return result


def test_cold_sprite_is_woken_and_held(url_server: WispServer, url_sprites) -> None:
    """After a server restart the sprite is cold; a URL request boots it and is held
    until the port answers (here: a server started in the sprite while the request
    waits), then gets the page."""
    name = url_sprites().name
    url_server.restart()
    client = SpritesClient(url_server.token, base_url=url_server.url)
    try:
        assert url_server.api("GET", f"/v1/sprites/{name}").json()["status"] == "cold"
        result = _request_that_wakes(url_server, name, client.sprite(name))
        assert result == {"status": 200, "text": f"hello from {name}\n"}, result
    finally:
        client.close()


def test_url_wakes_a_warm_and_a_cold_sprite(url_server: WispServer, url_sprites) -> None:
    """A warm sprite's server answers as soon as the request thaws it; after a cold sleep
    the relay does not reuse a connection into the stopped sprite: the request boots it
    and is held until the port answers again (docs/lifecycle.md)."""
    sprite = url_sprites()
    name = sprite.name
    start_http_server(sprite)
    want = f"hello from {name}\n"
    assert url_get(url_server, host(url_server, name), "/index.html",
                   token=url_server.token).text == want
    r = url_server.api("POST", f"/v1/sprites/{name}/sleep")
    assert r.json()["status"] == "warm"
    r = url_get(url_server, host(url_server, name), "/index.html", token=url_server.token)
    assert (r.status_code, r.text) == (200, want)
    assert url_server.api("GET", f"/v1/sprites/{name}").json()["status"] == "running"
    r = url_server.api("POST", f"/v1/sprites/{name}/sleep", json={"state": "cold"})
    assert r.json()["status"] == "cold"
    assert _request_that_wakes(url_server, name, sprite) == {"status": 200, "text": want}


def test_nothing_listening_is_a_502_page(url_server: WispServer, url_sprites) -> None:
    """No server on 8080: the request is held for the wake bound, then a short HTML 502
    that says what is missing (no traceback, no host detail)."""
    s = url_sprites()
    t = time.monotonic()
    r = url_get(url_server, host(url_server, s.name), "/", token=url_server.token)
    took = time.monotonic() - t
    assert r.status_code == 502
    assert r.headers["content-type"].startswith("text/html")
    assert f"Nothing is listening on port 8080 in sprite {s.name}" in r.text
    assert URL_WAKE_TIMEOUT - 0.5 <= took < URL_WAKE_TIMEOUT + 10
    assert "Traceback" not in r.text and "/var/" not in r.text


def test_api_unchanged_on_its_own_host(url_server: WispServer) -> None:
    """`localhost:<port>` and 127.0.0.1 are the API: JSON bodies, bearer check."""
    for name in ("localhost", "127.0.0.1"):
        r = url_get(url_server, f"{name}:{url_server.port}", "/v1/sprites")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = url_get(url_server, f"{name}:{url_server.port}", "/v1/sprites",
                    token=url_server.token)
        assert r.status_code == 200 and "sprites" in r.json()


def test_link_endpoint_rejects_bad_input(url_server: WispServer, url_sprites) -> None:
    """Unknown sprite: 404 sprite_not_found; a bad port or path: 400 with the contract
    error body."""
    r = url_server.api("POST", "/v1/sprites/no-such-sprite/url/link", json={})
    assert r.status_code == 404 and r.json()["error"] == "sprite_not_found"
    s = url_sprites()
    for body in ({"port": 0}, {"port": 70000}, {"port": "80"}, {"port": True},
                 {"path": "no-slash"}, {"path": "/a b"}, {"path": 5}):
        r = url_server.api("POST", f"/v1/sprites/{s.name}/url/link", json=body,
                           validate_request=False)
        assert r.status_code == 400 and r.json()["error"] == "bad_request", body


def wisp(server: WispServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(WISP_API=server.url, WISP_TOKEN=server.token, PYTHONPATH=str(REPO),
               XDG_CONFIG_HOME=str(REPO / ".no-config"))
    return subprocess.run([sys.executable, "-m", "wisp.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_url_show_and_open(url_server: WispServer, url_sprites) -> None:
    """`wisp url show NAME` prints the URL and its auth; `wisp url open NAME` prints a
    one-time link that works; `wisp url auth public NAME` opens the sprite to anyone."""
    s = url_sprites()
    start_http_server(s)
    r = wisp(url_server, "url", "show", s.name)
    assert r.returncode == 0, r.stderr
    assert f"http://{s.name}.localhost:{url_server.port}" in r.stdout and "sprite" in r.stdout
    shown = json.loads(wisp(url_server, "url", "show", s.name, "--json").stdout)
    assert shown["auth"] == "sprite"
    r = wisp(url_server, "url", "open", s.name)
    assert r.returncode == 0, r.stderr
    link = httpx.URL(r.stdout.strip())
    got = url_get(url_server, host(url_server, s.name), link.raw_path.decode())
    assert got.status_code == 302 and "set-cookie" in got.headers
    assert wisp(url_server, "url", "auth", "public", s.name).returncode == 0
    assert url_get(url_server, host(url_server, s.name), "/index.html").status_code == 200
    r = wisp(url_server, "url", "open", "no-such-sprite")
    assert r.returncode == 1 and "not found" in r.stderr
