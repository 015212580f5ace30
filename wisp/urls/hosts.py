"""Which sprite and port a request's `Host` names: `NAME.<domain>` or `PORT--NAME.<domain>`.

A host is compared the way DNS compares names: case-insensitively, and with a trailing dot
(`NAME.localhost.`, the fully qualified form) meaning the same name. A host that is not
below the domain (the bare `localhost`, `127.0.0.1`, any other name) is the API's. A host
below the domain that names no possible sprite (`a.b.localhost`, `-x.localhost`,
`0--x.localhost`) is still URL traffic: it gets the URL proxy's 404 page and never reaches
the API routes.

`PORT--NAME` wins over a sprite whose name looks like that: a sprite called `3000--web`
is `8080--3000--web.<domain>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Target", "Unroutable", "parse_host", "DEFAULT_PORT"]

#: The port a sprite URL reaches when the host names none and no service has `http_port`
#: (the Sprites convention; docs/services.md).
DEFAULT_PORT = 8080

_LABEL = re.compile(r"(?:([1-9][0-9]{0,4})--)?([a-z0-9][a-z0-9-]{0,62})")


@dataclass(frozen=True)
class Target:
    """A request for `port` in sprite `name`; `host` is the normalised host (no port)."""

    name: str
    port: int
    host: str
    #: False when the host named no port: a service's `http_port` then takes DEFAULT_PORT's
    #: place (the proxy looks it up).
    port_named: bool = field(default=True, compare=False)


class Unroutable:
    """A host below the URL domain that names no sprite (answered 404 by the proxy)."""

    def __init__(self, host: str) -> None:
        self.host = host


def parse_host(value: str | None, domain: str) -> Target | Unroutable | None:
    """The URL target `value` (a `Host` header) names; None when it is the API's."""
    if not value:
        return None
    host = value.strip().lower()
    if host.startswith("["):  # an IPv6 literal: never a sprite URL
        return None
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        host = name
    if host.endswith("."):
        host = host[:-1]
    suffix = "." + domain
    if not host.endswith(suffix):
        return None
    label = host[: -len(suffix)]
    found = _LABEL.fullmatch(label)
    if found is None:
        return Unroutable(host)
    port_text, sprite = found.groups()
    target_port = int(port_text) if port_text else DEFAULT_PORT
    if not 1 <= target_port <= 65535:
        return Unroutable(host)
    return Target(sprite, target_port, host, port_named=port_text is not None)
