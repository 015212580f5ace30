"""The `wisp` command line; `wisp.cli.main` holds the command group."""

from __future__ import annotations

from wisp.cli.main import cli, main

__all__ = ["cli", "main"]
