"""`wisp proxy NAME MAPPING...`: forward local TCP ports into a sprite, like `ssh -L`.

Each local connection gets its own proxy WebSocket (contract §3.5) through
`Client.open_proxy`, on one asyncio loop (the synchronous websockets client can deadlock
when bytes flow both ways at once, see there). The wire protocol has no half-close, so
the first side to end ends both (as the JS SDK does): a local client that shuts down its
sending side ends the connection. When the target resets its connection (close code
1011) the local connection is reset too; otherwise it is closed cleanly.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from wisp.cli.common import State, fail

if TYPE_CHECKING:  # asyncio too: `wisp --help` must not import it (tests/unit/test_cli.py)
    import asyncio

    from websockets.asyncio.client import ClientConnection

    from wisp.client import Client

__all__ = ["proxy", "Mapping", "parse_mapping"]

BIND = "127.0.0.1"
CHUNK = 32 * 1024


@dataclass(frozen=True)
class Mapping:
    local: int
    host: str
    remote: int

    def describe(self, local: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{BIND}:{self.local if local is None else local} -> {host}:{self.remote}"


def _port(text: str, what: str, lowest: int) -> int:
    if not (text.isascii() and text.isdigit()) or not lowest <= int(text) <= 65535:
        raise ValueError(f"{what} port {text!r} is not a number from {lowest} to 65535")
    return int(text)


def parse_mapping(text: str) -> Mapping:
    """`REMOTE` (the same port locally), `LOCAL:REMOTE`, or `LOCAL:HOST:REMOTE` (HOST an
    IP address, IPv6 in brackets, or localhost). LOCAL 0 picks a free port."""
    if ":" not in text:
        port = _port(text, "remote", 1)
        return Mapping(port, "localhost", port)
    local, rest = text.split(":", 1)
    host = "localhost"
    if ":" in rest:
        host, rest = rest.rsplit(":", 1)
        host = host.removeprefix("[").removesuffix("]") or "localhost"
    return Mapping(_port(local, "local", 0), host, _port(rest, "remote", 1))


def _mappings(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
              ) -> list[Mapping]:
    try:
        return [parse_mapping(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


async def _connection(client: Client, sprite: str, mapping: Mapping, where: str,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One local connection: a proxy socket to the sprite, bytes both ways until one side
    ends, then the other side ended the same way."""
    import asyncio

    from wisp.client import ClientError

    try:
        ws, _ = await client.open_proxy(sprite, mapping.remote, mapping.host)
    except ClientError as exc:
        click.echo(f"wisp proxy: {where}: {exc.message}", err=True)
        _reset(writer)
        return
    except BaseException:
        _reset(writer)
        raise
    up = asyncio.create_task(_upstream(reader, ws))
    try:
        await _downstream(ws, writer)
    finally:
        up.cancel()
        await asyncio.gather(up, return_exceptions=True)
        with contextlib.suppress(Exception):
            await ws.close()
        if ws.close_code in (None, 1000, 1001):
            writer.close()
        else:
            _reset(writer)


async def _upstream(reader: asyncio.StreamReader, ws: ClientConnection) -> None:
    """Local bytes to the sprite until the local side ends; then close the socket."""
    try:
        while data := await reader.read(CHUNK):
            await ws.send(data)
    except Exception:  # the local side was reset, or the WebSocket is already gone
        pass
    await ws.close()


async def _downstream(ws: ClientConnection, writer: asyncio.StreamWriter) -> None:
    """The sprite's bytes to the local side until the socket closes."""
    from websockets.exceptions import ConnectionClosed

    try:
        async for message in ws:
            if isinstance(message, bytes):
                writer.write(message)
                await writer.drain()
    except ConnectionClosed:
        pass
    except OSError:  # the local side is gone
        pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), so the local client sees an error, not an EOF."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _listen(mapping: Mapping) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((BIND, mapping.local))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {BIND}:{mapping.local}: {exc.strerror or exc}")
    return sock


async def _forward(client: Client, sprite: str, mappings: list[Mapping]) -> None:
    """Listen for every mapping, print each, serve until cancelled (Ctrl-C, SIGTERM)."""
    import asyncio

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    connections: set[asyncio.Task[None]] = set()
    servers: list[asyncio.Server] = []

    def acceptor(mapping: Mapping, where: str
                 ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = loop.create_task(_connection(client, sprite, mapping, where, reader,
                                                writer))
            connections.add(task)
            task.add_done_callback(connections.discard)
        return accept

    try:
        for mapping in mappings:
            sock = _listen(mapping)
            where = mapping.describe(sock.getsockname()[1])
            servers.append(await asyncio.start_server(acceptor(mapping, where), sock=sock))
            click.echo(f"Forwarding {where} in sprite {sprite}")
        click.echo("Press Ctrl-C to stop.", err=True)
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


@click.command()
@click.argument("name")
@click.argument("mappings", nargs=-1, required=True, metavar="[LOCAL:[HOST:]]REMOTE...",
                callback=_mappings)
@click.pass_obj
def proxy(state: State, name: str, mappings: list[Mapping]) -> None:
    """Forward local ports to ports in sprite NAME, like `ssh -L`, until Ctrl-C.

    REMOTE alone uses the same port on both sides; LOCAL:REMOTE a different local one
    (0: any free port); LOCAL:HOST:REMOTE reaches HOST (an IP address) as the sprite sees
    it instead of its localhost. Listens on 127.0.0.1 only; each local connection is its
    own connection in the sprite, which is woken if it is stopped."""
    import asyncio

    client = state.client()
    client.get_sprite(name)  # an unknown sprite fails now, not at the first connection
    try:
        asyncio.run(_forward(client, name, mappings))
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("Stopped.", err=True)
