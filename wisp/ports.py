"""Ports of a sprite: what listens in it (`ports/watch`) and TCP into it (`/proxy`).

Contract §3.5 and §3.6; user guide in docs/proxy.md.

* **Listening ports** are read from the sprite's own /proc/net/tcp and tcp6 (sockets in
  state LISTEN), inside its network namespace: what a process in the sprite binds, on any
  address, is what is reported. The owning process is the one holding the socket's inode
  among the processes in that namespace, reported by its pid inside the sprite (NSpid).
* **Watching** polls every `POLL_INTERVAL` seconds and turns each difference into
  `port_opened` / `port_closed`; the sprite is never woken by a watcher's poll (a stopped
  sprite has no listening ports).
* **Proxying** dials `host:port` from inside the sprite's namespace (`Sprites.connect`),
  so `localhost` is the sprite's loopback and nothing of the host is reachable that the
  sprite could not reach itself. `pump` then copies bytes both ways with backpressure: at
  most one chunk per direction is held here, the rest waits in the sockets' buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from wisp.errors import BadRequest, SpriteNotFound

if TYPE_CHECKING:
    from wisp.sprites import Sprites

__all__ = ["Ports", "Port", "Target", "Ending", "parse_proc_net", "parse_target", "pump",
           "socket_owners", "POLL_INTERVAL", "CHUNK"]

#: Seconds between two scans of a watched sprite's listening sockets.
POLL_INTERVAL = 0.5
#: Largest binary frame the proxy sends (the contract asks for ≤ 32 KiB).
CHUNK = 32 * 1024
#: TCP state LISTEN in /proc/net/tcp (include/net/tcp_states.h).
_LISTEN = "0A"

#: How a proxied connection ended: the target closed (EOF), the target reset it (or the
#: write to it failed), or the client went away.
Ending = Literal["target_closed", "target_reset", "client_closed"]


@dataclass(frozen=True)
class Port:
    """One listening address of a sprite; `pid` is 0 when no owner was found (it exited
    between the scan and the lookup)."""

    address: str
    port: int
    pid: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.address, self.port

    def event(self, kind: Literal["port_opened", "port_closed"]) -> dict[str, Any]:
        return {"type": kind, "port": self.port, "address": self.address, "pid": self.pid}


@dataclass(frozen=True)
class Target:
    """What a proxy client asked for: `host` is "localhost" or an IP address."""

    host: str
    port: int


# ------------------------------------------------------------------ listening sockets

def _address(hex_addr: str) -> str:
    """/proc/net prints an address as 32-bit words in host byte order."""
    raw = b"".join(struct.pack("=I", int(hex_addr[i:i + 8], 16))
                   for i in range(0, len(hex_addr), 8))
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def parse_proc_net(text: str) -> list[tuple[str, int, int]]:
    """(address, port, socket inode) of every LISTEN line of /proc/net/tcp or tcp6."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        try:
            addr, port = fields[1].rsplit(":", 1)
            found.append((_address(addr), int(port, 16), int(fields[9])))
        except (ValueError, OSError, struct.error):
            continue  # not a line the kernel writes
    return found


def _sprite_pid(host_pid: int) -> int:
    """The pid as the sprite sees it: the last NSpid field (0 if the process is gone)."""
    try:
        with open(f"/proc/{host_pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return 0


def socket_owners(netns: Path, inodes: set[int]) -> dict[int, int]:
    """inode → pid (inside the sprite) of a process in `netns` holding that socket.

    Only processes whose network namespace is `netns` are looked at, so a host process
    is never named. Blocking (walks /proc): call in a worker thread."""
    want = {f"socket:[{i}]": i for i in inodes}
    if not want:
        return {}
    try:
        ns = f"net:[{os.stat(netns).st_ino}]"
    except OSError:
        return {}
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/ns/net") != ns:
                continue
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                inode = want.get(os.readlink(fd.path))
                if inode is not None and inode not in found:
                    found[inode] = int(entry.name)
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if len(found) == len(want):
            break
    return {inode: _sprite_pid(pid) for inode, pid in found.items()}


# ------------------------------------------------------------------ the proxy's target

def parse_target(message: str | bytes | None) -> Target:
    """The proxy's first client frame: `{"host": "localhost", "port": 5432}`.

    `host` defaults to localhost and must be localhost or an IP address (names are not
    resolved); `port` is 1-65535, as a JSON integer or a string of digits."""
    if not isinstance(message, str):
        raise BadRequest("the first message must be a JSON text frame "
                         '{"host": ..., "port": ...}')
    try:
        body = json.loads(message)
    except (ValueError, RecursionError):
        raise BadRequest("the first message is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the first message must be a JSON object")
    host = body.get("host")
    if host is None or host == "":
        host = "localhost"
    if not isinstance(host, str):
        raise BadRequest("host must be a string")
    if host != "localhost":
        try:
            host = str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]")))
        except ValueError:
            raise BadRequest(f"host {host[:100]!r} is not localhost or an IP address"
                             ) from None
    port = body.get("port")
    if isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5:
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool):
        raise BadRequest("port must be an integer")
    if not 1 <= port <= 65535:
        raise BadRequest(f"port {port} is out of range 1-65535")
    return Target(host, port)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               receive: Callable[[], Awaitable[bytes | None]],
               send: Callable[[bytes], Awaitable[None]]) -> Ending:
    """Copy bytes between a client and a TCP connection until one side ends; close the
    TCP connection; say which side ended.

    `receive()` returns the client's next bytes, None once it is gone; `send(data)` must
    wait until the client took the data (that wait is the backpressure toward the target)
    and raise when the client is gone. There is no half-close: the wire protocol has no
    frame for it, so the first side to end ends both."""

    async def upstream() -> Ending:
        while True:
            data = await receive()
            if data is None:
                return "client_closed"
            if data:
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    return "target_reset"

    async def downstream() -> Ending:
        while True:
            try:
                data = await reader.read(CHUNK)
            except OSError:
                return "target_reset"
            if not data:
                return "target_closed"
            try:
                await send(data)
            except Exception:
                return "client_closed"

    up = asyncio.create_task(upstream())
    down = asyncio.create_task(downstream())
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        first = down if down in done else up  # both done: the target's word wins
        return first.result()
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)


# ------------------------------------------------------------------ the core

def _order(key: tuple[str, int]) -> tuple[int, str]:
    return key[1], key[0]


class Ports:
    """The two port operations on a sprite, by name."""

    def __init__(self, sprites: Sprites, interval: float = POLL_INTERVAL) -> None:
        self.sprites = sprites
        self.interval = interval

    async def wake(self, name: str) -> None:
        """Before a WebSocket upgrade: the sprite exists and runs (started if cold), so that
        a failure is an HTTP reply (404, 503…) rather than a closed socket."""
        await self.sprites.handle(name)

    def hold(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Activity while a proxied connection is open: the sprite does not sleep under
        it (docs/lifecycle.md)."""
        return self.sprites.activity.hold(self.sprites.row(name).id)

    async def dial(self, name: str, first_message: str | bytes | None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """Parse the proxy's first message and connect to its target inside the sprite.
        Raises `BadRequest` for a bad message, `wisp.network.DialError` when nothing
        answers there."""
        target = parse_target(first_message)
        return await self.sprites.connect(name, target.host, target.port)

    async def listening(self, name: str, known: dict[tuple[str, int], Port] | None = None
                        ) -> dict[tuple[str, int], Port]:
        """The sprite's listening ports now; a stopped sprite has none. `known` (an earlier
        answer) saves looking up the owners of ports that were already open then. Raises
        `SpriteNotFound` once the sprite is gone."""
        row = self.sprites.row(name)
        if self.sprites.status(row) == "cold":  # warm: frozen, its sockets still there
            return {}
        try:
            tables, netns = await self.sprites.proc_net(row)
        except OSError:  # stopped meanwhile: its namespace is gone
            return {}
        inodes: dict[tuple[str, int], int] = {}
        for text in tables.values():
            for address, port, inode in parse_proc_net(text):
                inodes.setdefault((address, port), inode)  # SO_REUSEPORT: one entry
        known = known or {}
        new = {inodes[k] for k in inodes if k not in known}
        owners = await asyncio.to_thread(
            socket_owners, netns, new) if new and netns is not None else {}
        return {k: known[k] if k in known else Port(k[0], k[1], owners.get(inode, 0))
                for k, inode in sorted(inodes.items(), key=lambda kv: _order(kv[0]))}

    async def watch(self, name: str) -> AsyncGenerator[dict[str, Any], None]:
        """`port_list` with what listens now, then a `port_opened` / `port_closed` per
        change, until the sprite is deleted (then the iterator ends)."""
        try:
            current = await self.listening(name)
            yield {"type": "port_list",
                   "ports": [p.event("port_opened") for p in current.values()]}
            while True:
                await asyncio.sleep(self.interval)
                now = await self.listening(name, current)
                for key in sorted(current.keys() - now.keys(), key=_order):
                    yield current[key].event("port_closed")
                for key in sorted(now.keys() - current.keys(), key=_order):
                    yield now[key].event("port_opened")
                current = now
        except SpriteNotFound:
            return

