"""Sleep and keep-awake verbs: `wisp sleep`, `wisp tasks` (docs/lifecycle.md)."""

from __future__ import annotations

import click

from wisp.cli.common import (
    State,
    json_option,
    resolve_named_sprite,
    resolve_sprite,
    sprite_option,
)

__all__ = ["sleep", "tasks"]


@click.command()
@click.argument("name", required=False)
@sprite_option
@click.option("--cold", is_flag=True,
              help="Stop it (processes ended, disk unmounted) instead of freezing it.")
@json_option
@click.pass_obj
def sleep(state: State, name: str | None, sprite: str | None, cold: bool,
          as_json: bool) -> None:
    """Put a sprite to sleep now: warm (frozen in RAM), or cold with --cold.

    Any later call that needs the sprite wakes it. NAME, or -s NAME, or the selected
    sprite."""
    reply = state.client().sleep_sprite(resolve_named_sprite(name, sprite), cold=cold)
    if as_json:
        from wisp.cli.output import print_json

        print_json(reply)
    else:
        click.echo(f"sprite {reply.get('name')} is {reply.get('status')}")


@click.group()
def tasks() -> None:
    """Keep-awake tasks: while one is live, the sprite does not sleep."""


@tasks.command("list")
@click.argument("name", required=False)
@sprite_option
@json_option
@click.pass_obj
def tasks_list(state: State, name: str | None, sprite: str | None, as_json: bool) -> None:
    """The sprite's live tasks (set here or by files in its /run/sprite/tasks/)."""
    from wisp.cli.output import print_json, print_table

    found = state.client().list_tasks(resolve_named_sprite(name, sprite))
    if as_json:
        print_json(found)
    else:
        print_table(["NAME", "EXPIRES", "SOURCE"],
                    [[t.get("name", ""), t.get("expires_at", ""), t.get("source", "")]
                     for t in found])


@tasks.command("hold")
@click.argument("task")
@sprite_option
@click.option("--ttl", default="10m", show_default=True, metavar="DURATION",
              help="How long: seconds, or 90s, 10m, 1h (at most 1h; hold again to renew).")
@json_option
@click.pass_obj
def tasks_hold(state: State, task: str, sprite: str | None, ttl: str, as_json: bool) -> None:
    """Hold the sprite (-s NAME, or the selected one) awake as TASK, waking it."""
    reply = state.client().set_task(resolve_sprite(sprite), task, ttl)
    if as_json:
        from wisp.cli.output import print_json

        print_json(reply)
    else:
        click.echo(f"task {reply.get('name', task)} holds until {reply.get('expires_at')}")


@tasks.command("release")
@click.argument("task")
@sprite_option
@click.pass_obj
def tasks_release(state: State, task: str, sprite: str | None) -> None:
    """Release TASK (set through the API) on the sprite (-s NAME, or the selected one)."""
    state.client().delete_task(resolve_sprite(sprite), task)
    click.echo(f"task {task} released")
