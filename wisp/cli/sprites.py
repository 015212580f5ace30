"""Sprite lifecycle verbs: create, list, show, destroy, use, fork, restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from wisp.cli.common import (
    SPRITE_FILE,
    State,
    fail,
    find_sprite_file,
    json_option,
    resolve_named_sprite,
    resolve_sprite,
    sprite_option,
)

__all__ = ["create", "list_", "show", "destroy", "use", "fork", "restart"]

SHOW_FIELDS = ("name", "id", "status", "labels", "url", "organization", "version",
               "created_at", "updated_at", "last_running_at", "last_warming_at")


def _show_sprite(sprite: Any, as_json: bool) -> None:
    from wisp.cli.output import print_fields, print_json

    if as_json:
        print_json(sprite)
    else:
        print_fields([(key, sprite.get(key)) for key in SHOW_FIELDS if key in sprite])


@click.command()
@click.argument("name")
@click.option("-l", "--label", "labels", multiple=True, metavar="LABEL",
              help="Label to attach (repeatable).")
@click.option("--runtime", type=click.Choice(["container", "vm"]), default=None,
              help="Its driver for life: a container, or a microVM whose checkpoints hold "
                   "memory (docs/vm.md). Default: the server's.")
@json_option
@click.pass_obj
def create(state: State, name: str, labels: tuple[str, ...], runtime: str | None,
           as_json: bool) -> None:
    """Create a sprite called NAME."""
    sprite = state.client().create_sprite(name, labels=list(labels), runtime=runtime)
    if as_json:
        from wisp.cli.output import print_json

        print_json(sprite)
    else:
        click.echo(f"created sprite {sprite.get('name', name)}")


@click.command("list")
@click.option("--prefix", metavar="P", help="Only sprites whose name starts with P.")
@json_option
@click.pass_obj
def list_(state: State, prefix: str | None, as_json: bool) -> None:
    """List sprites (every page)."""
    from wisp.cli.output import print_json, print_table

    sprites = list(state.client().list_sprites(prefix=prefix))
    if as_json:
        print_json(sprites)
        return
    print_table(["NAME", "STATUS", "LABELS", "CREATED"],
                [(s.get("name"), s.get("status"), s.get("labels"), s.get("created_at"))
                 for s in sprites])


@click.command()
@click.argument("name", required=False)
@json_option
@click.pass_obj
def show(state: State, name: str | None, as_json: bool) -> None:
    """Show one sprite [default: the selected one]."""
    _show_sprite(state.client().get_sprite(resolve_sprite(name)), as_json)


@click.command()
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def destroy(state: State, name: str, yes: bool) -> None:
    """Destroy sprite NAME with its disk and checkpoints."""
    if not yes:
        click.confirm(f"Destroy sprite {name!r}, its disk and all its checkpoints?",
                      abort=True, err=True)
    state.client().delete_sprite(name)
    click.echo(f"destroyed sprite {name}")


@click.command()
@click.argument("name", required=False)
@click.option("--unset", is_flag=True, help=f"Remove {SPRITE_FILE} from this directory.")
@click.option("--no-check", is_flag=True, help="Do not ask the server whether NAME exists.")
@click.pass_obj
def use(state: State, name: str | None, unset: bool, no_check: bool) -> None:
    """Select the sprite for commands run in this directory (and below).

    Writes NAME to ./.wisp-sprite; commands that take -s/--sprite fall back to the nearest
    such file up the tree. Without NAME, print the current selection."""
    here = Path.cwd() / SPRITE_FILE
    if unset:
        if name:
            raise click.UsageError("--unset takes no NAME")
        here.unlink(missing_ok=True)
        return
    if name is None:
        found = find_sprite_file()
        if found is None:
            fail(f"no sprite selected (no {SPRITE_FILE} here or above)")
        click.echo(f"{found[0]}  ({found[1]})")
        return
    if not no_check:
        state.client().get_sprite(name)
    here.write_text(name + "\n")
    click.echo(f"using sprite {name} in {Path.cwd()}")


@click.command()
@click.argument("source")
@click.argument("new_name")
@click.option("-c", "--checkpoint", metavar="ID",
              help="Start from this checkpoint of SOURCE [default: its current disk].")
@click.option("-l", "--label", "labels", multiple=True, metavar="LABEL",
              help="Label for the new sprite (repeatable).")
@json_option
@click.pass_obj
def fork(state: State, source: str, new_name: str, checkpoint: str | None,
         labels: tuple[str, ...], as_json: bool) -> None:
    """Create NEW_NAME as a copy of SOURCE's disk (or of one of its checkpoints)."""
    sprite = state.client().fork_sprite(source, new_name, checkpoint=checkpoint,
                                        labels=list(labels))
    if as_json:
        from wisp.cli.output import print_json

        print_json(sprite)
    else:
        origin = f"{source}@{checkpoint}" if checkpoint else source
        click.echo(f"forked {origin} into sprite {sprite.get('name', new_name)}")


@click.command()
@click.argument("name", required=False)
@sprite_option
@json_option
@click.pass_obj
def restart(state: State, name: str | None, sprite: str | None, as_json: bool) -> None:
    """Restart a sprite: end every process in it, keep its disk, run it again.

    The last resort for a wedged sprite: open exec and console sessions end too. NAME, or
    -s NAME, or the selected sprite."""
    target = resolve_named_sprite(name, sprite)
    reply = state.client().restart_sprite(target)
    if as_json:
        from wisp.cli.output import print_json

        print_json(reply)
    else:
        click.echo(f"restarted sprite {reply.get('sprite_name') or target}")
