"""Service verbs: `wisp services list|create|start|stop|logs|delete` (docs/services.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import click

from wisp.cli.common import State, fail, json_option, resolve_sprite, sprite_option

__all__ = ["services"]


@click.group()
def services() -> None:
    """Long-running processes the sprite keeps running: list, create, start, stop, logs,
    delete."""


def _follow(events: Iterable[dict[str, Any]], as_json: bool) -> None:
    """Print a service stream: output as it comes, the rest as one status line each; exit 1
    on an `error` event."""
    for event in events:
        kind = event.get("type")
        if as_json:
            click.echo(json.dumps(event))
        elif kind in ("stdout", "stderr"):
            click.echo(str(event.get("data", "")), nl=False, err=kind == "stderr")
        elif kind in ("exit", "stopped"):
            click.echo(f"{kind} (exit code {event.get('exit_code')})", err=True)
        elif kind in ("started", "stopping"):
            click.echo(str(kind), err=True)
        if kind == "error":
            fail(str(event.get("data") or event.get("error") or "operation failed"))


@services.command("list")
@sprite_option
@json_option
@click.pass_obj
def list_(state: State, sprite: str | None, as_json: bool) -> None:
    """List the sprite's services and their state."""
    from wisp.cli.output import print_json, print_table

    items = state.client().list_services(resolve_sprite(sprite))
    if as_json:
        print_json(items)
        return
    rows = []
    for s in items:
        st = s.get("state") or {}
        rows.append((s.get("name"), st.get("status"), st.get("pid"), st.get("restart_count"),
                     " ".join([str(s.get("cmd", "")), *s.get("args", [])]),
                     ",".join(s.get("needs", [])), s.get("http_port")))
    print_table(["NAME", "STATUS", "PID", "RESTARTS", "COMMAND", "NEEDS", "HTTP PORT"], rows)


@services.command("create", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@sprite_option
@click.option("--needs", multiple=True, metavar="SERVICE",
              help="A service to start before this one (repeat).")
@click.option("--http-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="The port it serves HTTP on (one service per sprite).")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE",
              help="An environment variable (repeat).")
@click.option("--dir", "dir_", metavar="PATH", help="Working directory [default: home].")
@click.option("--duration", type=float, default=None, metavar="SECONDS",
              help="Follow its output this long [server default: 5].")
@click.option("--json", "as_json", is_flag=True, help="Print the raw NDJSON events.")
@click.pass_obj
def create(state: State, name: str, command: tuple[str, ...], sprite: str | None,
           needs: tuple[str, ...], http_port: int | None, env: tuple[str, ...],
           dir_: str | None, duration: float | None, as_json: bool) -> None:
    """Create (or replace) service NAME running COMMAND, and start it.

    Put `--` before a COMMAND that has options: `wisp services create web -- python3 -m
    http.server 8000`."""
    environment: dict[str, str] = {}
    for entry in env:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{entry!r}: expected KEY=VALUE", param_hint="--env")
        environment[key] = value
    body: dict[str, Any] = {"cmd": command[0], "args": list(command[1:]),
                            "needs": list(needs), "http_port": http_port, "env": environment}
    if dir_:
        body["dir"] = dir_
    _follow(state.client().put_service(resolve_sprite(sprite), name, body,
                                       duration=duration), as_json)


@services.command("start")
@click.argument("name")
@sprite_option
@click.option("--duration", type=float, default=None, metavar="SECONDS",
              help="Follow its output this long [server default: 5].")
@click.option("--json", "as_json", is_flag=True, help="Print the raw NDJSON events.")
@click.pass_obj
def start(state: State, name: str, sprite: str | None, duration: float | None,
          as_json: bool) -> None:
    """Start service NAME (it is restarted again whenever it exits)."""
    _follow(state.client().start_service(resolve_sprite(sprite), name, duration=duration),
            as_json)


@services.command("stop")
@click.argument("name")
@sprite_option
@click.option("--timeout", type=float, default=None, metavar="SECONDS",
              help="SIGKILL after this long [server default: 10].")
@click.option("--json", "as_json", is_flag=True, help="Print the raw NDJSON events.")
@click.pass_obj
def stop(state: State, name: str, sprite: str | None, timeout: float | None,
         as_json: bool) -> None:
    """Stop service NAME (SIGTERM, then SIGKILL); it stays stopped, across restarts too."""
    _follow(state.client().stop_service(resolve_sprite(sprite), name, timeout=timeout),
            as_json)


@services.command("logs")
@click.argument("name")
@sprite_option
@click.option("-n", "--lines", type=click.IntRange(0, 100000), default=None,
              help="Lines of each stream to show [server default: 100].")
@click.option("-f", "--follow", type=float, default=None, metavar="SECONDS",
              help="Then follow new output this long.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw NDJSON events.")
@click.pass_obj
def logs(state: State, name: str, sprite: str | None, lines: int | None,
         follow: float | None, as_json: bool) -> None:
    """Print service NAME's recent output (also in /.sprite/logs/services/ in the sprite)."""
    _follow(state.client().service_logs(resolve_sprite(sprite), name, lines=lines,
                                        duration=follow), as_json)


@services.command("delete")
@click.argument("name")
@sprite_option
@click.pass_obj
def delete(state: State, name: str, sprite: str | None) -> None:
    """Stop service NAME and remove it; its log files stay."""
    state.client().delete_service(resolve_sprite(sprite), name)
    click.echo(f"deleted service {name}")
