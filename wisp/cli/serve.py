"""`wisp serve`: run the API server on this host (local admin command)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["serve"]


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Where all server state lives [default: $WISP_DATA_DIR, the config "
                   "file's [server] data_dir, or /var/lib/wisp].")
@click.option("--listen", metavar="HOST:PORT",
              help="Address of the HTTP API [default: $WISP_LISTEN, the config file's "
                   "[server] listen, or 127.0.0.1:7770].")
@click.option("--config", "config_file", envvar="WISP_CONFIG", show_envvar=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="TOML config file (storage backend, sprite defaults).")
def serve(data_dir: Path | None, listen: str | None, config_file: Path | None) -> None:
    """Run the Wisp API server (as root) until interrupted.

    On start it writes the API URL and token to ~/.config/wisp/client.json, so `wisp` on
    this host needs no --api/--token."""
    # Unset options stay None so that wisp.config.load_config applies its own order
    # (defaults < config file < WISP_* env < these options).
    from wisp.server import serve as run_server

    run_server(data_dir=data_dir, listen=listen, config_file=config_file)
