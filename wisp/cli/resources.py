"""Resources verbs: `wisp resources get|set|clear` (docs/resources.md)."""

from __future__ import annotations

from typing import Any

import click

from wisp.cli.common import State, fail, json_option, resolve_sprite, sprite_option

__all__ = ["resources"]


@click.group()
def resources() -> None:
    """A sprite's memory and CPU limits: get, set, clear.

    Changes apply to a running sprite at once, without a restart; a cold sprite keeps them
    for its next start. Unset limits follow the server's config.
    """


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        from wisp.cli.output import print_json

        print_json(data)
        return
    memory, cpu = data["memory"], data.get("cpu") or {}
    origin = {True: "server default", False: "set for this sprite"}
    click.echo(f"memory  {memory['limit_mb']} MB  ({origin[bool(memory.get('default'))]})")
    if "limit_cpus" in cpu:
        click.echo(f"cpu     {cpu['limit_cpus']:g} CPUs  ({origin[bool(cpu.get('default'))]})")


@resources.command("get")
@sprite_option
@json_option
@click.pass_obj
def get(state: State, sprite: str | None, as_json: bool) -> None:
    """Show the sprite's limits (never wakes it)."""
    _print(state.client().get_resources(resolve_sprite(sprite)), as_json)


@resources.command("set")
@click.option("--memory", "memory_mb", type=int, metavar="MB",
              help="Memory limit in MB (64 up to the host's RAM).")
@click.option("--cpus", type=float, metavar="N",
              help="CPU limit in CPUs, e.g. 0.5 or 2 (0.05 up to the host's CPUs).")
@sprite_option
@json_option
@click.pass_obj
def set_(state: State, memory_mb: int | None, cpus: float | None, sprite: str | None,
         as_json: bool) -> None:
    """Change the limits given; the others keep their value."""
    if memory_mb is None and cpus is None:
        fail("nothing to set: pass --memory MB and/or --cpus N")
    _print(state.client().set_resources(resolve_sprite(sprite), memory_mb=memory_mb,
                                        cpus=cpus), as_json)


@resources.command("clear")
@sprite_option
@json_option
@click.pass_obj
def clear(state: State, sprite: str | None, as_json: bool) -> None:
    """Back to the server's defaults."""
    _print(state.client().clear_resources(resolve_sprite(sprite)), as_json)
