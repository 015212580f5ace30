"""Rendering for humans (Rich tables, progress spinners) and for scripts (`--json`).

Rich is imported inside the functions: it costs more to import than the whole rest of the
CLI, and `wisp --help` or `--json` output never need it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from wisp.cli.common import fail

if TYPE_CHECKING:
    from rich.console import Console

    from wisp.client import ProgressEvent

__all__ = [
    "console",
    "print_json",
    "print_table",
    "print_fields",
    "jsonable",
    "follow_progress",
    "progress_display",
]


def console(stderr: bool = False) -> Console:
    """A Rich console on the current stdout/stderr; when that is not a terminal the width
    is unlimited so piped tables never wrap (scripts should still prefer --json)."""
    from rich.console import Console

    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    return Console(stderr=stderr, width=1000, no_color=True, highlight=False)


def jsonable(value: Any) -> Any:
    """Dataclasses, paths and datetimes as JSON values (for local objects like images)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
            return value.isoformat(timespec="seconds") + "Z"
        return value.isoformat(timespec="seconds")
    return value


def print_json(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2))


def _cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(jsonable(value))


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A borderless table (greppable, like `kubectl get`); `-` marks empty cells."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console().print(table)


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """`key  value` lines for one object (the human form of `show`)."""
    from rich.table import Table

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in pairs:
        table.add_row(key, _cell(value))
    console().print(table)


@contextmanager
def progress_display(title: str) -> Iterator[Callable[[str], None]]:
    """Yields `update(line)`: on a terminal a spinner shows the latest line and earlier
    lines scroll above it; otherwise every line is printed plainly to stderr."""
    err = console(stderr=True)
    if not err.is_terminal:
        yield lambda line: err.print(line, markup=False, highlight=False)
        return
    with err.status(title) as status:
        last: list[str] = []

        def update(line: str) -> None:
            if last:
                err.print(f"[dim]  {_escape(last[0])}[/dim]", highlight=False)
                last.clear()
            last.append(line)
            status.update(_escape(line))

        yield update
        if last:
            err.print(f"[dim]  {_escape(last[0])}[/dim]", highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def follow_progress(events: Iterable[ProgressEvent], *, as_json: bool,
                    title: str) -> ProgressEvent:
    """Consume a checkpoint/restore NDJSON stream and return its `complete` event.

    --json echoes each event as one JSON line (NDJSON, flushed per line) so scripts can
    follow along; an `error` event, or a stream that ends without `complete`, exits 1."""
    if as_json:
        for event in events:
            click.echo(json.dumps(event), nl=True)
            if event.get("type") == "complete":
                return event
            if event.get("type") == "error":
                fail(str(event.get("error") or event.get("data") or "operation failed"))
        fail("the server ended the progress stream before it completed")
    with progress_display(title) as update:
        for event in events:
            kind = event.get("type")
            if kind == "complete":
                done = event
                break
            if kind == "error":
                fail(str(event.get("error") or event.get("data") or "operation failed"))
            update(str(event.get("data", "")))
        else:
            fail("the server ended the progress stream before it completed")
    click.echo(str(done.get("data") or "done"))
    return done
