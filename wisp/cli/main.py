"""The `wisp` command: a client of the Wisp HTTP API (plus the local `serve` and `image`).

Every sprite/exec/checkpoint verb goes through `wisp.client.Client` to the server, never
into the engine directly, so the CLI exercises exactly what the SDKs use. Options can come
from WISP_* environment variables (`--api` = WISP_API, `--token` = WISP_TOKEN, `--context` =
WISP_CONTEXT, and `WISP_<COMMAND>_<OPTION>` for the rest).

Exit codes: 0 ok; 1 the operation failed (`error: <message>` on stderr); 2 usage error;
`wisp exec`/`console` exit with the remote command's code (255: connection lost).
"""

from __future__ import annotations

from typing import Any

import click

from wisp import __version__
from wisp.cli.checkpoints import checkpoint, restore
from wisp.cli.common import State, fail, known_error_message
from wisp.cli.contexts import context
from wisp.cli.exec import console, exec_
from wisp.cli.images import image
from wisp.cli.lifecycle import sleep, tasks
from wisp.cli.policy import policy
from wisp.cli.proxy import proxy
from wisp.cli.resources import resources
from wisp.cli.serve import serve
from wisp.cli.services import services
from wisp.cli.sprites import create, destroy, fork, list_, restart, show, use
from wisp.cli.urls import url

__all__ = ["cli", "main"]


class WispGroup(click.Group):
    """Lists commands in the order they were added (workflow order, not alphabetical) and
    turns expected failures (API errors, unreachable server, engine errors from the local
    admin commands) into `error: <message>` with exit 1 instead of a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = known_error_message(exc)
            if message is None:
                raise
            fail(message)


@click.group(cls=WispGroup, context_settings={"auto_envvar_prefix": "WISP",
                                              "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="wisp")
@click.option("--api", metavar="URL", envvar="WISP_API", show_envvar=True,
              help="Wisp API URL [default: the context's].")
@click.option("--token", metavar="TOKEN", envvar="WISP_TOKEN", show_envvar=True,
              help="API bearer token [default: the context's].")
@click.option("--context", metavar="NAME", envvar="WISP_CONTEXT", show_envvar=True,
              help="Server to use, by its name in ~/.config/wisp/client.json "
                   "[default: the current context].")
@click.pass_context
def cli(ctx: click.Context, api: str | None, token: str | None, context: str | None) -> None:
    """Wisp: persistent Linux sandboxes ("sprites") on this host."""
    ctx.obj = State(api, token, context)


for command in (create, list_, show, use, exec_, console, proxy, restart, checkpoint, restore,
                fork, url, destroy, policy, resources, services, sleep, tasks, context, serve,
                image):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point (`wisp = wisp.cli.main:main`)."""
    cli(prog_name="wisp")
