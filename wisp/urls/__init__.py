"""Sprite URLs: `http://NAME.<domain>:<port>/` served by the Wisp server (docs/urls.md).

`SpriteUrls` is the one object the server builds: the proxy that answers URL traffic
(`UrlRouter` puts it in front of the API) and the access rules (token, one-time links,
session cookies) that both the proxy and the link endpoint use.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TypedDict

from wisp.errors import BadRequest
from wisp.urls.access import LINK_PARAM, Access
from wisp.urls.hosts import DEFAULT_PORT, Target, parse_host
from wisp.urls.proxy import UrlProxy, UrlRouter

if TYPE_CHECKING:
    from wisp.config import UrlsConfig
    from wisp.sprites import Sprites

__all__ = ["SpriteUrls", "UrlLink", "UrlRouter", "Target", "parse_host", "DEFAULT_PORT"]

#: Longest path a link may carry.
MAX_PATH = 2048


class UrlLink(TypedDict):
    url: str
    expires_at: str


class SpriteUrls:
    def __init__(self, sprites: Sprites, token: str, config: UrlsConfig) -> None:
        self.sprites = sprites
        self.access = Access(token)
        self.proxy = UrlProxy(sprites, self.access, config.domain, config.wake_timeout)

    async def start(self) -> None:
        await self.proxy.start()

    async def stop(self) -> None:
        await self.proxy.stop()

    def link(self, name: str, port: object = None, path: object = None) -> UrlLink:
        """A one-time link that opens sprite `name`'s URL (at `port`, `path`) in a browser
        and leaves a session cookie for that host behind (wisp/urls/access.py)."""
        row = self.sprites.row(name)
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 1 <= port <= 65535):
            raise BadRequest("port must be a whole number from 1 to 65535")
        if path is None:
            path = "/"
        if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH \
                or any(c.isspace() or ord(c) < 0x20 or c in "#\x7f" for c in path):
            raise BadRequest("path must start with '/' and hold no spaces, control "
                             f"characters or '#' (at most {MAX_PATH} characters)")
        link = self.access.make_link(row.id)
        base = self.sprites.url(row.name, None if port in (None, DEFAULT_PORT) else int(port))
        sep = "&" if "?" in path else "?"
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(link.expires))
        return {"url": f"{base}{path}{sep}{LINK_PARAM}={link.token}", "expires_at": expires}
