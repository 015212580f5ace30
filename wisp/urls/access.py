"""Who may use a sprite URL: the bearer token, a session cookie, or anyone ("public").

`url_settings.auth` of the sprite decides: "public" lets every request through; "sprite"
(the default) needs either

* `Authorization: Bearer <the API token>` (scripts, curl, the SDKs), or
* the session cookie a one-time link sets (browsers, which cannot send a header).

One-time links: an authenticated API call (`POST /v1/sprites/{name}/url/link`) makes a
random token, kept in memory for `LINK_TTL` seconds and good for one use. The URL proxy,
seeing `?wisp_link=<token>` on a URL of that sprite, spends it, sets the cookie and
redirects to the same URL without the parameter. A restart of the server forgets unused
links (they are short-lived anyway).

The cookie is not the API token and cannot be turned into it: it is
`v1.<expiry>.<sprite id>.<HMAC-SHA256>` with a key derived from the API token, so it
names one sprite (by id: a sprite deleted and made again under the same name does not
accept it), runs out after `COOKIE_TTL`, survives a server restart, and stops working
when the token changes. It is HttpOnly, SameSite=Lax and scoped to the host that set it.

Neither the Wisp token nor the cookie is forwarded to the sprite (`strip_credentials`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Access", "Link", "COOKIE_NAME", "LINK_PARAM", "LINK_TTL", "COOKIE_TTL"]

#: The query parameter a one-time link carries.
LINK_PARAM = "wisp_link"
#: The session cookie; a sprite cannot set or read it (the proxy drops it both ways).
COOKIE_NAME = "wisp_url_session"
#: Seconds a one-time link stays good.
LINK_TTL = 300
#: Seconds a session cookie stays good.
COOKIE_TTL = 24 * 3600
#: Most links waiting to be used at once; the oldest are dropped beyond it.
MAX_LINKS = 10_000


@dataclass(frozen=True)
class Link:
    token: str
    sprite_id: str
    expires: float


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Access:
    """Links and cookies of one server (its API token is the root of both)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._key = hmac.new(self._token, b"wisp sprite url cookie v1", hashlib.sha256).digest()
        self._links: dict[str, Link] = {}

    # -- the bearer token ---------------------------------------------------------------
    def bearer_ok(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        expected = b"Bearer " + self._token
        return any(k == b"authorization" and hmac.compare_digest(v, expected)
                   for k, v in headers)

    def carries_token(self, value: bytes) -> bool:
        """Whether a header value holds the API token in any form (never forwarded)."""
        return self._token in value

    # -- one-time links -----------------------------------------------------------------
    def make_link(self, sprite_id: str, now: float | None = None) -> Link:
        now = time.time() if now is None else now
        self._expire(now)
        while len(self._links) >= MAX_LINKS:
            self._links.pop(next(iter(self._links)))
        link = Link(secrets.token_urlsafe(24), sprite_id, now + LINK_TTL)
        self._links[link.token] = link
        return link

    def spend_link(self, token: str, sprite_id: str | None) -> bool:
        """Use up link `token`; True when it was good for sprite `sprite_id`. Any attempt
        spends it, so a link shown to the wrong host is gone as well."""
        link = self._links.pop(token, None)
        return (link is not None and sprite_id is not None and link.sprite_id == sprite_id
                and link.expires > time.time())

    def _expire(self, now: float) -> None:
        for token in [t for t, link in self._links.items() if link.expires <= now]:
            del self._links[token]

    # -- session cookies ----------------------------------------------------------------
    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def make_cookie(self, sprite_id: str, now: float | None = None) -> str:
        """The cookie's value for `sprite_id`, good for `COOKIE_TTL` seconds."""
        expires = int((time.time() if now is None else now) + COOKIE_TTL)
        payload = f"v1.{expires}.{sprite_id}"
        return f"{payload}.{self._sign(payload)}"

    def cookie_ok(self, value: str, sprite_id: str) -> bool:
        payload, _, sig = value.rpartition(".")
        parts = payload.split(".")
        if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit():
            return False
        if not hmac.compare_digest(sig.encode(), self._sign(payload).encode()):
            return False
        return parts[2] == sprite_id and int(parts[1]) > time.time()

    def session_ok(self, headers: Iterable[tuple[bytes, bytes]], sprite_id: str) -> bool:
        """A good session cookie for `sprite_id` among the request's cookies (any of
        them: another site under the same domain may have set a stale one beside it)."""
        return any(self.cookie_ok(value, sprite_id)
                   for value in cookie_values(headers, COOKIE_NAME))

    def set_cookie_header(self, sprite_id: str) -> bytes:
        return (f"{COOKIE_NAME}={self.make_cookie(sprite_id)}; Path=/; Max-Age={COOKIE_TTL}; "
                "HttpOnly; SameSite=Lax").encode()


def cookie_values(headers: Iterable[tuple[bytes, bytes]], name: str) -> list[str]:
    out = []
    for key, value in headers:
        if key != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            k, eq, v = part.strip().partition("=")
            if eq and k == name:
                out.append(v.strip().strip('"'))
    return out


def without_cookie(value: bytes, name: str) -> bytes:
    """A `Cookie` header value minus every cookie called `name`."""
    kept = [p for p in value.split(b";") if p.strip().partition(b"=")[0] != name.encode()]
    return b";".join(kept).strip()
