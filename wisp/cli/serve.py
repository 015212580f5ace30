"""`wisp serve`: run the API server on this host (local admin command)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from wisp.cli.common import context_name_callback

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
@click.option("--context", "context_name", metavar="NAME", envvar="WISP_SERVE_CONTEXT",
              show_envvar=True, callback=context_name_callback,
              help="Name to register this server under in ~/.config/wisp/client.json "
                   "[default: local for /var/lib/wisp, else the data dir's folder name].")
@click.option("--stop-sprites", is_flag=True, default=None,
              help="Stopping this server stops every sprite, and its start clears what a "
                   "killed server left [default: sprites outlive the server and the next "
                   "start adopts them; $WISP_STOP_SPRITES, [server] stop_sprites].")
def serve(data_dir: Path | None, listen: str | None, config_file: Path | None,
          context_name: str | None, stop_sprites: bool | None) -> None:
    """Run the Wisp API server (as root) until interrupted.

    Running sprites outlive the server: stop it (SIGTERM, Ctrl-C) for an upgrade and the
    next `wisp serve` on the same data dir adopts them, sessions included.

    On start it registers the API URL and token as a context in
    ~/.config/wisp/client.json (current unless another context is), so `wisp` on this
    host needs no --api/--token. WISP_NO_CLIENT_CONFIG=1 leaves that file alone."""
    # Unset options stay None so that wisp.config.load_config applies its own order
    # (defaults < config file < WISP_* env < these options).
    from wisp.server import serve as run_server

    if context_name is not None:  # read by wisp.client.announce_server
        os.environ["WISP_SERVE_CONTEXT"] = context_name

    if stop_sprites:  # the strongest source, like the other options
        os.environ["WISP_STOP_SPRITES"] = "1"
    run_server(data_dir=data_dir, listen=listen, config_file=config_file)
