"""What every client command shares: the API endpoint, the selected sprite, error exits.

Nothing here imports httpx, rich or websockets at module level; `wisp --help` must stay
fast, so the client is built only when a command actually talks to the server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from wisp.client import Client

__all__ = [
    "SPRITE_FILE",
    "State",
    "fail",
    "known_error_message",
    "sprite_option",
    "resolve_sprite",
    "find_sprite_file",
    "json_option",
]

#: Per-directory sprite selection, written by `wisp use`, searched up the tree.
SPRITE_FILE = ".wisp-sprite"

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """`ctx.obj` of the root group: the --api/--token values and the lazily built client."""

    def __init__(self, api: str | None, token: str | None) -> None:
        self.api = api
        self.token = token
        self._client: Client | None = None

    def client(self) -> Client:
        """Resolve the endpoint (options/env, then client.json) on first use only, so
        local commands (`serve`, `image`, `use` without a check) never need a server."""
        if self._client is None:
            from wisp.client import Client, discover_endpoint

            api, token = discover_endpoint(self.api, self.token)
            self._client = Client(api, token)
            ctx = click.get_current_context(silent=True)
            if ctx is not None:
                ctx.find_root().call_on_close(self._client.close)
        return self._client


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: <message>` to stderr and exit; 1 = the operation failed."""
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def known_error_message(exc: BaseException) -> str | None:
    """The message to print for an expected failure, or None for a real bug.

    Looks the error classes up in `sys.modules` instead of importing them: if
    `wisp.client` (httpx) or `wisp.errors` was never imported, none of their exceptions can
    have been raised, and importing them here would slow down every command."""
    client = sys.modules.get("wisp.client")
    if client is not None and isinstance(exc, client.ClientError):
        return str(exc.message)
    errors = sys.modules.get("wisp.errors")
    if errors is not None and isinstance(exc, (errors.WispError, errors.FsError)):
        return str(getattr(exc, "message", exc))
    return None


def find_sprite_file(start: Path | None = None) -> tuple[str, Path] | None:
    """The nearest non-empty `.wisp-sprite` in `start` or a parent: (sprite name, file)."""
    here = (start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / SPRITE_FILE
        try:
            name = candidate.read_text().strip()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        if name:
            return name, candidate
    return None


def resolve_sprite(value: str | None) -> str:
    """-s/--sprite (or WISP_SPRITE), else the nearest `.wisp-sprite`, else a usage error."""
    if value:
        return value
    found = find_sprite_file()
    if found is not None:
        return found[0]
    raise click.UsageError(
        f"no sprite selected: pass -s NAME, set WISP_SPRITE, or run `wisp use NAME` "
        f"(writes {SPRITE_FILE} here)")


def sprite_option(fn: F) -> F:
    return click.option(
        "-s", "--sprite", metavar="NAME", envvar="WISP_SPRITE", show_envvar=True,
        help=f"Sprite to act on [default: from the nearest {SPRITE_FILE}].")(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON (the API's objects) instead of a table.")(fn)
