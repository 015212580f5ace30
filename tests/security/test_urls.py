"""Sprite URLs must not open more than they should (docs/urls.md, "Security").

Each test tries to get past the URL proxy's checks and must fail: credentials leaking to
the sprite, a cookie of one sprite opening another, forged or expired cookies, a spent or
misdirected link, and Host header tricks toward another sprite or the API. Each also
shows that the same request succeeds with what it lacked, so that a proxy letting
everything through, or nothing, fails the test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import httpx
import pytest
from sprites.types import URLSettings

from tests.framework.server import WispServer
from tests.framework.urls import ECHO_APP, host, start_app, url_get

pytestmark = pytest.mark.debian

COOKIE = "wisp_url_session"


def echo_sprite(url_sprites, **kw):  # type: ignore[no-untyped-def]
    s = url_sprites(**kw)
    start_app(s, ECHO_APP, 8080, "echo")
    return s


def cookie_from_link(server: WispServer, name: str) -> str:
    link = httpx.URL(server.api("POST", f"/v1/sprites/{name}/url/link", json={}).json()["url"])
    r = url_get(server, host(server, name), link.raw_path.decode())
    assert r.status_code == 302, r.text
    return r.headers["set-cookie"].split(";", 1)[0]


def headers_seen(response: httpx.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in response.json()["headers"]:
        out.setdefault(key.lower(), []).append(value)
    return out


def test_token_and_cookie_never_reach_the_sprite(url_server: WispServer, url_sprites) -> None:
    """The sprite sees neither `Authorization` with the Wisp token nor the Wisp cookie
    (other cookies and headers pass), and gets X-Forwarded-* from the proxy, not the
    client's forgeries. The sprite cannot set the Wisp cookie in the browser either."""
    s = echo_sprite(url_sprites)
    h = host(url_server, s.name)
    cookie = cookie_from_link(url_server, s.name)
    r = url_get(url_server, h, "/x", token=url_server.token,
                cookie=f"theme=dark; {cookie}; lang=en",
                headers={"X-Forwarded-For": "6.6.6.6", "X-App": "kept"})
    assert r.status_code == 200, r.text
    seen = headers_seen(r)
    assert "authorization" not in seen
    assert seen["cookie"] == ["theme=dark; lang=en"]
    assert url_server.token not in r.text and cookie.split("=", 1)[1] not in r.text
    assert seen["x-app"] == ["kept"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-host"] == [h] and seen["host"] == [h]
    set_cookies = r.headers.get_list("set-cookie")
    assert "app=1; Path=/" in set_cookies
    assert not any(c.startswith(COOKIE) for c in set_cookies)
    # with the cookie alone: it is still not forwarded
    r = url_get(url_server, h, "/y", cookie=cookie)
    assert r.status_code == 200 and "cookie" not in headers_seen(r)


def test_token_not_forwarded_to_a_public_sprite(url_server: WispServer, url_sprites) -> None:
    """A client that sends the Wisp token to a public sprite does not hand it to the
    sprite; an Authorization header of the app's own passes."""
    s = echo_sprite(url_sprites, url_settings=URLSettings(auth="public"))
    h = host(url_server, s.name)
    r = url_get(url_server, h, "/", token=url_server.token)
    assert r.status_code == 200 and "authorization" not in headers_seen(r)
    r = url_get(url_server, h, "/", headers={"Authorization": f"bearer {url_server.token}"})
    assert r.status_code == 200 and "authorization" not in headers_seen(r)
    r = url_get(url_server, h, "/", headers={"Authorization": "Basic YXBwOnB3"})
    assert headers_seen(r)["authorization"] == ["Basic YXBwOnB3"]


def test_cookie_of_one_sprite_does_not_open_another(url_server: WispServer,
                                                    url_sprites) -> None:
    """A's cookie opens A, not B (sent to B's host, as a sprite under the same domain
    could make a browser do)."""
    a, b = echo_sprite(url_sprites), echo_sprite(url_sprites)
    cookie_a = cookie_from_link(url_server, a.name)
    assert url_get(url_server, host(url_server, a.name), cookie=cookie_a).status_code == 200
    r = url_get(url_server, host(url_server, b.name), cookie=cookie_a)
    assert r.status_code == 401 and "method" not in r.text
    # and not another port of B either
    assert url_get(url_server, host(url_server, b.name, 8080),
                   cookie=cookie_a).status_code == 401


def _sign(token: str, payload: str) -> str:
    """The server's cookie signature (wisp/urls/access.py), for forging well-signed ones."""
    key = hmac.new(token.encode(), b"wisp sprite url cookie v1", hashlib.sha256).digest()
    sig = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def test_forged_and_expired_cookies_are_refused(url_server: WispServer, url_sprites) -> None:
    """Garbage, a tampered expiry or sprite id, a wrong key, and a correctly signed but
    expired cookie all get 401; a correctly signed live one (the control) gets in."""
    s = echo_sprite(url_sprites)
    h = host(url_server, s.name)
    good = cookie_from_link(url_server, s.name).split("=", 1)[1]
    _, expiry, sprite_id, sig = good.split(".")
    other_id = url_server.api("GET", f"/v1/sprites/{echo_sprite(url_sprites).name}"
                              ).json()["id"]
    later = str(int(expiry) + 10**6)
    past = f"v1.{int(time.time()) - 5}.{sprite_id}"
    forged = [
        "x", "", f"v1.{expiry}.{sprite_id}", f"v1.{later}.{sprite_id}.{sig}",
        f"v1.{expiry}.{other_id}.{sig}", f"v1.{expiry}.{sprite_id}.{sig[:-2]}AA",
        f"v1.{expiry}.{sprite_id}.{_sign('not-the-token', f'v1.{expiry}.{sprite_id}')}",
        f"{past}.{_sign(url_server.token, past)}",
        url_server.token,
    ]
    for value in forged:
        r = url_get(url_server, h, cookie=f"{COOKIE}={value}")
        assert r.status_code == 401, value
    live = f"v1.{int(time.time()) + 60}.{sprite_id}"
    assert url_get(url_server, h, cookie=f"{COOKIE}={live}.{_sign(url_server.token, live)}"
                   ).status_code == 200
    assert url_get(url_server, h, cookie=f"{COOKIE}={good}").status_code == 200


def test_links_are_single_use_and_bound_to_their_sprite(url_server: WispServer,
                                                        url_sprites) -> None:
    """A link shown to another sprite's host does not log in there and is spent; a made
    up link does nothing; a fresh link works (control)."""
    a, b = echo_sprite(url_sprites), echo_sprite(url_sprites)
    link = httpx.URL(url_server.api("POST", f"/v1/sprites/{a.name}/url/link",
                                    json={}).json()["url"])
    token = link.params["wisp_link"]
    r = url_get(url_server, host(url_server, b.name), f"/?wisp_link={token}")
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = url_get(url_server, host(url_server, a.name), f"/?wisp_link={token}")
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = url_get(url_server, host(url_server, a.name), "/?wisp_link=made-up")
    assert r.status_code == 401 and "set-cookie" not in r.headers
    assert cookie_from_link(url_server, a.name).startswith(COOKIE + "=")


def test_unknown_sprite_looks_like_a_private_one(url_server: WispServer,
                                                 url_sprites) -> None:
    """Without credentials an unknown name and an existing private sprite get the same
    401 page (nothing tells which names exist); with the token the unknown one is 404."""
    s = echo_sprite(url_sprites)
    known = url_get(url_server, host(url_server, s.name))
    unknown = url_get(url_server, host(url_server, "no-such-sprite-here"))
    assert known.status_code == unknown.status_code == 401
    assert known.text == unknown.text
    assert url_get(url_server, host(url_server, "no-such-sprite-here"),
                   token=url_server.token).status_code == 404


@pytest.mark.parametrize("trick", [
    "{name}.localhost.evil", "{name}.localhost..", "x{name}.localhost.evil:{port}",
])
def test_hosts_outside_the_domain_are_the_api(url_server: WispServer, url_sprites,
                                              trick: str) -> None:
    """A host that only contains the sprite's URL host is the API's: the bearer check
    answers, never the sprite."""
    s = echo_sprite(url_sprites)
    h = trick.format(name=s.name, port=url_server.port)
    r = url_get(url_server, h, "/")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = url_get(url_server, h, "/v1/sprites", token=url_server.token)
    assert r.status_code == 200 and "sprites" in r.json()


@pytest.mark.parametrize("trick", [
    "{name}..localhost", ".{name}.localhost", "a.{name}.localhost", "-{name}.localhost",
    "0--{name}.localhost", "99999--{name}.localhost", "08080--{name}.localhost",
    "{name}%2e.localhost", "..localhost",
])
def test_malformed_sprite_hosts_reach_nothing(url_server: WispServer, url_sprites,
                                              trick: str) -> None:
    """Hosts below the domain that name no sprite: the proxy's 404 page, even with the
    token; never the sprite's app and never the API."""
    s = echo_sprite(url_sprites)
    h = trick.format(name=s.name)
    r = url_get(url_server, f"{h}:{url_server.port}", "/v1/sprites", token=url_server.token)
    assert r.status_code == 404, h
    assert r.headers["content-type"].startswith("text/html")
    assert "method" not in r.text and "sprites" not in r.text


@pytest.mark.parametrize("form", ["{NAME}.LOCALHOST:{port}", "{name}.localhost.:{port}",
                                  "{name}.LocalHost"])
def test_case_and_trailing_dot_are_the_same_sprite(url_server: WispServer, url_sprites,
                                                   form: str) -> None:
    """DNS names are case-insensitive and `NAME.localhost.` is the same name: the same
    sprite answers, with the same auth (401 without the token)."""
    s = echo_sprite(url_sprites)
    h = form.format(name=s.name, NAME=s.name.upper(), port=url_server.port)
    assert url_get(url_server, h, "/").status_code == 401
    r = url_get(url_server, h, "/", token=url_server.token)
    assert r.status_code == 200 and r.json()["path"] == "/"


def test_api_paths_on_a_sprite_host_go_to_the_sprite(url_server: WispServer,
                                                     url_sprites) -> None:
    """`/v1/sprites` on a sprite's host is the sprite's path: its app answers; the
    cookie of a sprite does not open the API on the API's host."""
    s = echo_sprite(url_sprites)
    cookie = cookie_from_link(url_server, s.name)
    r = url_get(url_server, host(url_server, s.name), "/v1/sprites", cookie=cookie)
    assert r.status_code == 200 and r.json()["path"] == "/v1/sprites"
    r = url_get(url_server, f"localhost:{url_server.port}", "/v1/sprites", cookie=cookie)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


def test_websocket_needs_the_same_auth(url_server: WispServer, url_sprites) -> None:
    """A WebSocket upgrade without credentials is refused before anything reaches the
    sprite; with the cookie it passes to the app (which is no WebSocket server, so its
    own answer comes back as the refusal)."""
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    from tests.framework.urls import loopback_socket

    s = echo_sprite(url_sprites)
    url = f"ws://{host(url_server, s.name)}/"
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(url, sock=loopback_socket(url_server), open_timeout=30)
    assert refused.value.response.status_code == 401
    cookie = cookie_from_link(url_server, s.name)
    with pytest.raises(InvalidStatus) as passed:
        ws_client.connect(url, sock=loopback_socket(url_server), open_timeout=30,
                          additional_headers={"Cookie": cookie})
    assert passed.value.response.status_code == 200  # the echo app's JSON, not a 401
