"""`wisp url`: a sprite's URL, a one-time browser link to it, and who may open it."""

from __future__ import annotations

import click

from wisp.cli.common import State, json_option, resolve_sprite

__all__ = ["url"]


@click.group()
def url() -> None:
    """Sprite URLs: http://NAME.localhost:PORT/ reaches port 8080 in the sprite."""


@url.command("show")
@click.argument("name", required=False)
@json_option
@click.pass_obj
def show(state: State, name: str | None, as_json: bool) -> None:
    """Print the sprite's URL and who may open it [default: the selected sprite]."""
    sprite = state.client().get_sprite(resolve_sprite(name))
    auth = (sprite.get("url_settings") or {}).get("auth", "sprite")
    if as_json:
        from wisp.cli.output import print_json

        print_json({"url": sprite.get("url"), "auth": auth})
    else:
        click.echo(f"{sprite.get('url')}  (auth: {auth})")


@url.command("open")
@click.argument("name", required=False)
@click.option("-p", "--port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Another port in the sprite (the PORT--NAME host) [default: 8080].")
@click.option("--path", metavar="PATH", help="Path to open [default: /].")
@click.option("--browser", is_flag=True, help="Also open the link in a web browser.")
@click.pass_obj
def open_(state: State, name: str | None, port: int | None, path: str | None,
          browser: bool) -> None:
    """Print a one-time link that opens the sprite's URL in a browser.

    The link is good once, for a few minutes; opening it leaves a session cookie for
    that sprite's host, so the browser needs no token afterwards."""
    link = state.client().url_link(resolve_sprite(name), port=port, path=path)
    click.echo(link.get("url"))
    if browser:
        import webbrowser

        webbrowser.open(str(link.get("url")))


@url.command("auth")
@click.argument("mode", type=click.Choice(["sprite", "public"]))
@click.argument("name", required=False)
@click.pass_obj
def auth(state: State, mode: str, name: str | None) -> None:
    """Set who may open the URL: "sprite" (token or link cookie) or "public" (anyone)."""
    target = resolve_sprite(name)
    state.client().update_sprite(target, url_settings={"auth": mode})
    click.echo(f"sprite {target} URL auth: {mode}")
