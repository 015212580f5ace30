"""Egress policy verbs: `wisp policy get|set|allow|deny|clear`."""

from __future__ import annotations

import json
from typing import TextIO

import click

from wisp.cli.common import State, fail, json_option, resolve_sprite, sprite_option

__all__ = ["policy"]


@click.group()
def policy() -> None:
    """Which names a sprite may reach: get, set, allow, deny, clear.

    Rules are exact names, `*.suffix` (names under it) or `*`; the most specific wins, and
    a name no rule matches is denied unless `*` is allowed. No rules at all: open egress.
    """


def _print(rules: list[dict[str, str]]) -> None:
    if not rules:
        click.echo("no policy: egress is open")
        return
    for rule in rules:
        if "include" in rule:
            click.echo(f"include {rule['include']}")
        else:
            click.echo(f"{rule.get('action', '?'):5}  {rule.get('domain', '?')}")


@policy.command("get")
@sprite_option
@json_option
@click.pass_obj
def get(state: State, sprite: str | None, as_json: bool) -> None:
    """Show the sprite's policy."""
    from wisp.cli.output import print_json

    data = state.client().get_network_policy(resolve_sprite(sprite))
    if as_json:
        print_json(data)
    else:
        _print(data["rules"])


@policy.command("set")
@click.argument("source", metavar="FILE", type=click.File("r"), default="-")
@sprite_option
@click.pass_obj
def set_(state: State, source: TextIO, sprite: str | None) -> None:
    """Replace the policy with FILE's JSON (`{"rules": [...]}` or a bare array; `-` reads
    standard input)."""
    try:
        doc = json.load(source)
    except ValueError as exc:
        fail(f"{getattr(source, 'name', 'input')}: not JSON ({exc})")
    rules = doc.get("rules") if isinstance(doc, dict) else doc
    if not isinstance(rules, list):
        fail("expected {\"rules\": [...]} or a JSON array of rules")
    state.client().set_network_policy(resolve_sprite(sprite), rules)
    click.echo(f"policy set: {len(rules)} rule(s)")


def _edit(state: State, sprite: str | None, domains: tuple[str, ...], action: str) -> None:
    name = resolve_sprite(sprite)
    client = state.client()
    rules = [r for r in client.get_network_policy(name)["rules"]
             if r.get("domain") not in domains]
    if not rules and action == "allow":
        click.echo("note: the sprite had no policy; from now on only the allowed names are "
                   "reachable", err=True)
    rules += [{"domain": d, "action": action} for d in domains]
    client.set_network_policy(name, rules)
    _print(rules)


@policy.command("allow")
@click.argument("domains", metavar="DOMAIN...", nargs=-1, required=True)
@sprite_option
@click.pass_obj
def allow(state: State, domains: tuple[str, ...], sprite: str | None) -> None:
    """Allow DOMAIN (an exact name, `*.suffix` or `*`), replacing any rule for it."""
    _edit(state, sprite, domains, "allow")


@policy.command("deny")
@click.argument("domains", metavar="DOMAIN...", nargs=-1, required=True)
@sprite_option
@click.pass_obj
def deny(state: State, domains: tuple[str, ...], sprite: str | None) -> None:
    """Deny DOMAIN (an exact name, `*.suffix` or `*`), replacing any rule for it."""
    _edit(state, sprite, domains, "deny")


@policy.command("clear")
@sprite_option
@click.pass_obj
def clear(state: State, sprite: str | None) -> None:
    """Remove every rule: open egress."""
    state.client().set_network_policy(resolve_sprite(sprite), [])
    click.echo("no policy: egress is open")
