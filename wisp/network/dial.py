"""Sockets inside a sprite's network namespace, opened by the host.

The URL proxy, the port proxy and ports/watch all need to reach what a sprite serves on
its own loopback (`localhost:8080` in the sprite is not reachable from the host's network,
by design). A socket belongs to the namespace it was created in, whatever thread uses it
afterwards: so the calling thread enters the namespace (`setns`, which moves that thread
only), creates the socket and returns to the host's namespace at once; the event loop then
connects and uses it as any other socket. No process is started per connection.

The event loop's own thread does this, without a hop to a worker thread: it is three
system calls (~20 µs) with no await between them, so nothing else runs on that thread
while it is in the sprite's namespace, and a worker-thread hop cost ~0.3 ms per request
of the URL proxy (docs/urls.md). If the return to the host's namespace ever failed, the
process exits rather than run on in a sprite's namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["DialError", "open_connection", "in_netns", "read_proc_net", "target"]

CLONE_NEWNET = 0x40000000
DIAL_TIMEOUT = 5.0
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class DialError(Exception):
    """The target refused, timed out, or is not an address (message safe to show)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(netns: Path, fn: Callable[[], T]) -> T:
    """Run `fn` in this thread inside `netns`, then return the thread to where it was.
    `fn` must not block or yield to other code (the event loop's thread may call this)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            return fn()
        finally:
            try:
                _setns(home)
            except OSError:  # stranded in a sprite's namespace: never go on there
                os._exit(70)
    finally:
        os.close(home)


def target(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    if not 1 <= port <= 65535:
        raise DialError(f"port {port} is out of range")
    if host in ("", "localhost"):
        return socket.AF_INET, "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise DialError(f"host {host!r} is not localhost or an IP address") from None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), str(ip)


async def open_connection(netns: Path, host: str, port: int, timeout: float = DIAL_TIMEOUT
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A TCP connection to `host:port` as seen from inside `netns`, and the target as
    "ip:port". Raises DialError with a message fit for a client."""
    family, ip = target(host, port)

    def make() -> socket.socket:
        return socket.socket(family, socket.SOCK_STREAM)

    try:
        sock = in_netns(netns, make)
    except OSError as exc:
        raise DialError(f"the sprite's network is not available ({exc.strerror})") from None
    shown = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
    except TimeoutError:
        sock.close()
        raise DialError(f"dial tcp {shown}: timed out") from None
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno) if exc.errno else "failed"
        raise DialError(f"dial tcp {shown}: {reason.lower()}") from None
    except BaseException:
        sock.close()
        raise
    return reader, writer, shown


def read_proc_net(netns: Path, names: tuple[str, ...] = ("tcp", "tcp6")) -> dict[str, str]:
    """/proc/net/<name> as seen inside `netns` (blocking: call in a worker thread)."""
    def read() -> dict[str, str]:
        out = {}
        for name in names:
            try:
                out[name] = Path("/proc/thread-self/net", name).read_text()
            except FileNotFoundError:  # tcp6 with IPv6 off
                out[name] = ""
        return out

    return in_netns(netns, read)
