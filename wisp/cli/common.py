"""What every client command shares: the API endpoint, the selected sprite, error exits.

Nothing here imports httpx, rich or websockets at module level; `wisp --help` must stay
fast, so the client is built only when a command actually talks to the server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from wisp.client import Client, Endpoint

__all__ = [
    "context_name_callback",
    "SPRITE_FILE",
    "State",
    "Failure",
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
    """`ctx.obj` of the root group: the --api/--token/--context values and the lazily
    built client."""

    def __init__(self, api: str | None, token: str | None,
                 context: str | None = None) -> None:
        self.api = api
        self.token = token
        self.context = context
        self._client: Client | None = None

    def endpoint(self) -> Endpoint:
        """The server this command talks to (`wisp.client.resolve_endpoint`)."""
        from wisp.client import resolve_endpoint

        return resolve_endpoint(self.api, self.token, context=self.context)

    def client(self) -> Client:
        """Resolve the endpoint (options/env, then a context of client.json) on first use
        only, so local commands (`serve`, `image`, `context`, `use --no-check`) never need
        a server."""
        if self._client is None:
            from wisp.client import Client

            found = self.endpoint()
            self._client = Client(found.api, found.token)
            ctx = click.get_current_context(silent=True)
            if ctx is not None:
                ctx.find_root().call_on_close(self._client.close)
        return self._client


class Failure(click.ClickException):
    """An expected failure: click prints `error: <message>` (one line, newline-terminated)
    to stderr and exits with `exit_code`.

    Raised instead of printing on the spot so that the line is written only after every
    `with` block of the command has closed: a progress spinner (Rich keeps redrawing its
    line on the terminal) or a raw-mode terminal would otherwise swallow or mangle it."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message.rstrip("\n"))
        self.exit_code = code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", file=file, err=file is None)


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit with `error: <message>` on stderr; 1 = the operation failed (see `Failure`)."""
    raise Failure(message, code)


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


def resolve_named_sprite(name: str | None, sprite: str | None) -> str:
    """A verb that takes the sprite as NAME or as -s NAME: the one given (both must
    agree), else `resolve_sprite`'s default."""
    if name and sprite and name != sprite:
        raise click.UsageError(f"two sprites given: {name} and -s {sprite}")
    return resolve_sprite(name or sprite)


def context_name_callback(ctx: click.Context, param: click.Parameter,
                          value: str | None) -> str | None:
    """Click callback: a context name as `wisp.client` accepts it, else a usage error."""
    from wisp.client import ConfigError, check_context_name

    if value is None:
        return None
    try:
        return check_context_name(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.message, ctx=ctx, param=param) from None


def sprite_option(fn: F) -> F:
    return click.option(
        "-s", "--sprite", metavar="NAME", envvar="WISP_SPRITE", show_envvar=True,
        help=f"Sprite to act on [default: from the nearest {SPRITE_FILE}].")(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON (the API's objects) instead of a table.")(fn)
