"""`wisp context list|show|use|add|remove`: the named servers kept in client.json.

A context is a server's API URL and token under a name. `wisp serve` registers itself
(`wisp.client.register_server`); these commands list, pick, add and drop them. They only
edit the file and never talk to a server.
"""

from __future__ import annotations

import os
import sys

import click

from wisp.cli.common import State, context_name_callback, fail, json_option

__all__ = ["context"]


def _url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from wisp.client import ConfigError, check_api_url

    try:
        return check_api_url(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.message, ctx=ctx, param=param) from None


def _redact(token: str | None) -> str | None:
    if not token:
        return None
    return f"{token[:4]}… ({len(token)} characters; --show-token prints it)"


@click.group()
def context() -> None:
    """Named servers ("contexts") in ~/.config/wisp/client.json.

    `wisp serve` adds its own; `--context NAME` or WISP_CONTEXT picks one for one command,
    `wisp context use NAME` for every later one."""


@context.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List the contexts; `*` marks the current one."""
    from wisp.cli.output import print_json, print_table
    from wisp.client import load_client_config

    config = load_client_config()
    if as_json:
        print_json({"current": config.current,
                    "contexts": {name: {"api": c.api, "data_dir": c.data_dir}
                                 for name, c in sorted(config.contexts.items())}})
        return
    print_table(["CURRENT", "NAME", "API", "DATA DIR"],
                [("*" if name == config.current else "", name, c.api, c.data_dir)
                 for name, c in sorted(config.contexts.items())])


@context.command()
@click.argument("name", required=False, callback=context_name_callback)
@click.option("--show-token", is_flag=True, help="Print the token instead of its start.")
@json_option
@click.pass_obj
def show(state: State, name: str | None, show_token: bool, as_json: bool) -> None:
    """Show which server a command would use [default: with the current options and
    environment; NAME: that context] and why."""
    from wisp.cli.output import print_fields, print_json
    from wisp.client import resolve_endpoint

    if name is None:
        found = state.endpoint()
    else:  # the context itself, whatever WISP_API / --api say
        found = resolve_endpoint(context=name, env={
            k: v for k, v in os.environ.items() if k not in ("WISP_API", "WISP_TOKEN")})
    token = found.token if show_token else _redact(found.token)
    fields = [("context", found.context), ("api", found.api), ("token", token),
              ("source", found.source)]
    if as_json:
        print_json(dict(fields))
    else:
        print_fields(fields)


@context.command()
@click.argument("name")
def use(name: str) -> None:
    """Make NAME the current context (the server of every later command)."""
    from wisp.client import edit_client_config

    with edit_client_config() as config:
        if name not in config.contexts:
            fail(f"no context {name!r} (known: {', '.join(sorted(config.contexts)) or 'none'})")
        config.current = name
        api = config.contexts[name].api
    click.echo(f"using context {name} ({api})")


@context.command()
@click.argument("name", callback=context_name_callback)
@click.argument("api", metavar="URL", callback=_url)
@click.option("--token", metavar="TOKEN",
              help="The server's API token; `-` reads it from stdin (keeps it out of ps).")
@click.option("--use", "make_current", is_flag=True, help="Make it the current context.")
def add(name: str, api: str, token: str | None, make_current: bool) -> None:
    """Add (or replace) context NAME for the server at URL.

    It becomes current with --use, or when there is no current context yet."""
    from wisp.client import Context, edit_client_config

    if token == "-":
        token = sys.stdin.readline().strip()
    with edit_client_config() as config:
        verb = "replaced" if name in config.contexts else "added"
        config.contexts[name] = Context(api, token or None)
        if make_current or config.current is None:
            config.current = name
        current = config.current == name
    click.echo(f"{verb} context {name} ({api})" + (", now current" if current else ""))


@context.command()
@click.argument("name")
def remove(name: str) -> None:
    """Remove context NAME (the server itself is not touched)."""
    from wisp.client import edit_client_config

    with edit_client_config() as config:
        if config.contexts.pop(name, None) is None:
            fail(f"no context {name!r}")
        was_current = config.current == name
        if was_current:
            config.current = None
    note = ("; no current context now: `wisp context use NAME` picks one"
            if was_current else "")
    click.echo(f"removed context {name}{note}")
