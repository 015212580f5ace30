"""Sprite URL parts without a server: host parsing, links and cookies, `[urls]` config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import wisp.urls
from wisp.config import load_config
from wisp.errors import BadRequest
from wisp.urls.access import COOKIE_NAME, Access, cookie_values, without_cookie
from wisp.urls.hosts import Target, Unroutable, parse_host


def test_exported_members() -> None:
    """The package's surface is the server's one object plus host parsing."""
    assert sorted(wisp.urls.__all__) == sorted(
        ["SpriteUrls", "UrlLink", "UrlRouter", "Target", "parse_host", "DEFAULT_PORT"])


@pytest.mark.parametrize("host,expected", [
    ("web.localhost:7770", Target("web", 8080, "web.localhost")),
    ("web.localhost", Target("web", 8080, "web.localhost")),
    ("WEB.LocalHost.:7770", Target("web", 8080, "web.localhost")),
    ("3000--web.localhost:7770", Target("web", 3000, "3000--web.localhost")),
    ("8080--3000--web.localhost", Target("3000--web", 8080, "8080--3000--web.localhost")),
    ("0--web.localhost", Target("0--web", 8080, "0--web.localhost")),
])
def test_sprite_hosts(host: str, expected: Target) -> None:
    """NAME.<domain> and PORT--NAME.<domain>, compared as DNS names; a label that is not
    a valid port prefix is part of the name."""
    assert parse_host(host, "localhost") == expected


@pytest.mark.parametrize("host", [
    None, "", "localhost", "localhost:7770", "127.0.0.1:7770", "[::1]:7770",
    "web.localhost.evil", "web.localhost..", "weblocalhost", "web.localhost:",
])
def test_api_hosts(host: str | None) -> None:
    """Hosts that are not below the domain are the API's."""
    assert parse_host(host, "localhost") is None


@pytest.mark.parametrize("host", [
    "a.b.localhost", "-web.localhost", "..localhost", "web..localhost", "99999--web.localhost",
    "we b.localhost", "web%2e.localhost", "_web.localhost",
])
def test_unroutable_hosts(host: str) -> None:
    """Below the domain but no sprite: the proxy's 404, never the API."""
    assert isinstance(parse_host(host, "localhost"), Unroutable)


def test_other_domain() -> None:
    assert parse_host("web.sprites.example.com", "sprites.example.com") == Target(
        "web", 8080, "web.sprites.example.com")
    assert parse_host("web.localhost", "sprites.example.com") is None


def test_links_are_single_use_and_bound() -> None:
    """A link is good once, for its sprite, before it expires; any use spends it."""
    access = Access("tok")
    link = access.make_link("sprite-a")
    assert not access.spend_link(link.token, "sprite-b")
    assert not access.spend_link(link.token, "sprite-a")  # spent by the wrong attempt
    link = access.make_link("sprite-a")
    assert access.spend_link(link.token, "sprite-a")
    assert not access.spend_link(link.token, "sprite-a")
    old = access.make_link("sprite-a", now=time.time() - 3600)
    assert not access.spend_link(old.token, "sprite-a")


def test_cookies() -> None:
    """A cookie opens its sprite only, until it expires, and only under the key of the
    token that made it; it does not contain the token."""
    access = Access("the-token")
    value = access.make_cookie("sprite-a")
    assert "the-token" not in value
    assert access.cookie_ok(value, "sprite-a")
    assert not access.cookie_ok(value, "sprite-b")
    assert not Access("other-token").cookie_ok(value, "sprite-a")
    assert not access.cookie_ok(access.make_cookie("sprite-a", now=time.time() - 10**6),
                                "sprite-a")
    assert not access.cookie_ok(value + "x", "sprite-a")
    assert not access.cookie_ok("", "sprite-a")
    header = access.set_cookie_header("sprite-a").decode()
    assert header.startswith(COOKIE_NAME + "=") and "HttpOnly" in header
    assert "SameSite=Lax" in header


def test_cookie_headers() -> None:
    headers = [(b"cookie", f"a=1; {COOKIE_NAME}=v1; b=2".encode()),
               (b"cookie", f"{COOKIE_NAME}=v2".encode())]
    assert cookie_values(headers, COOKIE_NAME) == ["v1", "v2"]
    assert without_cookie(headers[0][1], COOKIE_NAME) == b"a=1; b=2"
    assert without_cookie(headers[1][1], COOKIE_NAME) == b""


def test_urls_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[urls] from TOML, env over file, bad values refused."""
    for key in ("WISP_URL_DOMAIN", "WISP_URL_WAKE_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    assert load_config(tmp_path).urls.domain == "localhost"
    assert load_config(tmp_path).urls.wake_timeout == 10.0
    f = tmp_path / "c.toml"
    f.write_text('[urls]\ndomain = "sprites.example.com"\nwake_timeout = 3\n')
    cfg = load_config(tmp_path, config_file=f)
    assert (cfg.urls.domain, cfg.urls.wake_timeout) == ("sprites.example.com", 3.0)
    monkeypatch.setenv("WISP_URL_WAKE_TIMEOUT", "1.5")
    assert load_config(tmp_path, config_file=f).urls.wake_timeout == 1.5
    monkeypatch.delenv("WISP_URL_WAKE_TIMEOUT")
    for bad in ('domain = "Foo.com"', 'domain = "a..b"', 'domain = "10.0.0.1"',
                'domain = ""', 'domain = "x.com."', "wake_timeout = 0",
                'wake_timeout = "x"', "wake_timeout = true"):
        f.write_text(f"[urls]\n{bad}\n")
        with pytest.raises(BadRequest, match="urls"):
            load_config(tmp_path, config_file=f)
