"""Checkpoint verbs: `wisp checkpoint create|list|show|delete` and `wisp restore`."""

from __future__ import annotations

import click

from wisp.cli.common import State, json_option, resolve_sprite, sprite_option

__all__ = ["checkpoint", "restore"]


@click.group()
def checkpoint() -> None:
    """Snapshots of a sprite's disk: create, list, show, delete."""


@checkpoint.command("create")
@sprite_option
@click.option("-m", "--comment", metavar="TEXT", help="Note stored with the checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw NDJSON progress events.")
@click.pass_obj
def create(state: State, sprite: str | None, comment: str | None, as_json: bool) -> None:
    """Checkpoint the sprite's disk now."""
    from wisp.cli.output import follow_progress

    name = resolve_sprite(sprite)
    events = state.client().create_checkpoint(name, comment=comment)
    follow_progress(events, as_json=as_json, title=f"checkpointing {name}")


@checkpoint.command("list")
@sprite_option
@click.option("-a", "--all", "include_auto", is_flag=True,
              help="Include automatic checkpoints.")
@json_option
@click.pass_obj
def list_(state: State, sprite: str | None, include_auto: bool, as_json: bool) -> None:
    """List the sprite's checkpoints, newest first."""
    from wisp.cli.output import print_json, print_table

    items = state.client().list_checkpoints(resolve_sprite(sprite), include_auto=include_auto)
    if as_json:
        print_json(items)
        return
    print_table(["ID", "CREATED", "SOURCE", "COMMENT"],
                [(c.get("id"), c.get("create_time"), c.get("source_id"), c.get("comment"))
                 for c in items])


@checkpoint.command("show")
@click.argument("checkpoint_id", metavar="ID")
@sprite_option
@json_option
@click.pass_obj
def show(state: State, checkpoint_id: str, sprite: str | None, as_json: bool) -> None:
    """Show one checkpoint."""
    from wisp.cli.output import print_fields, print_json

    item = state.client().get_checkpoint(resolve_sprite(sprite), checkpoint_id)
    if as_json:
        print_json(item)
        return
    print_fields([(k, item.get(k)) for k in
                  ("id", "create_time", "comment", "source_id", "history", "is_auto", "health")
                  if k in item])


@checkpoint.command("delete")
@click.argument("checkpoint_id", metavar="ID")
@sprite_option
@click.pass_obj
def delete(state: State, checkpoint_id: str, sprite: str | None) -> None:
    """Delete checkpoint ID (not the one the sprite currently runs on)."""
    state.client().delete_checkpoint(resolve_sprite(sprite), checkpoint_id)
    click.echo(f"deleted checkpoint {checkpoint_id}")


@click.command()
@click.argument("checkpoint_id", metavar="ID")
@sprite_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw NDJSON progress events.")
@click.option("--disk-only", is_flag=True,
              help="A VM sprite boots on the checkpoint's disk instead of resuming its memory.")
@click.pass_obj
def restore(state: State, checkpoint_id: str, sprite: str | None, as_json: bool,
            disk_only: bool) -> None:
    """Roll the sprite's disk back to checkpoint ID.

    Every process in the sprite is stopped, open exec sessions end, and the sprite
    starts again on the restored disk; a VM sprite resumes the checkpoint's memory
    instead, its processes going on where they were (docs/vm.md)."""
    from wisp.cli.output import follow_progress

    name = resolve_sprite(sprite)
    events = state.client().restore_checkpoint(name, checkpoint_id, memory=not disk_only)
    follow_progress(events, as_json=as_json, title=f"restoring {name} to {checkpoint_id}")
