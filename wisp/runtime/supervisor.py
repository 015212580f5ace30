"""Client of the service supervisor inside wisp-init (`svc-*` requests, see the protocol
at the top of `wisp/runtime/init/wisp-init.c`).

The agent supervises services itself (restart with backoff, logs, stop timeouts), so a
crash is handled while the server is busy or even gone; the server only tells it what to
run (`define`) and what to do (`start`, `stop`, `signal`, `delete`), and asks `status`.
Every call is one connection: one request packet, one answer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from wisp.errors import BadRequest, SpriteUnresponsive, SystemError_
from wisp.runtime.agent import (
    ANSWER_TIMEOUT,
    MAX_REQUEST,
    _connect,
    _encode_request,
    _fit_send_buffer,
    _send,
)

__all__ = ["ServiceStatus", "SupervisorError", "define", "start", "stop", "delete",
           "signal", "status", "quiesce", "define_request", "LOG_DIR", "MAX_DEFINITION"]

#: Where the agent writes services' logs inside the sprite (a writable bind of the info
#: dir's `logs/`, see wisp/runtime/oci.py).
LOG_DIR = "/.sprite/logs/services"
#: Largest spawn request of one service (wisp-init.c's SVC_SPEC_MAX): 64 of them fit the
#: agent's memory reserve many times over.
MAX_DEFINITION = 128 * 1024
_LIST_BYTES = 64 * 400 + 1024


class SupervisorError(Exception):
    """The agent refused a service request; `reason` is its fixed message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ServiceStatus:
    """One line of `svc-list`; 0 / -1 / "" mean unknown."""

    name: str
    status: str
    pid: int
    started_at: int
    restart_count: int
    next_restart_at: int
    last_exit: int
    error: str


async def _call(sock: Path, fields: Sequence[bytes], size: int = 4096) -> bytes:
    request = b"\0".join(fields) + b"\0"
    if len(request) > MAX_REQUEST:
        raise BadRequest(f"service definition too large ({len(request)} bytes)")
    try:
        conn = await asyncio.wait_for(_connect(sock), ANSWER_TIMEOUT)
    except (TimeoutError, OSError):
        raise SpriteUnresponsive("the sprite's init agent cannot be reached") from None
    try:
        _fit_send_buffer(conn, len(request))
        await asyncio.wait_for(_send(conn, request), ANSWER_TIMEOUT)
        loop = asyncio.get_running_loop()
        reply = await asyncio.wait_for(loop.sock_recv(conn, size), ANSWER_TIMEOUT)
    except (TimeoutError, OSError):
        raise SpriteUnresponsive("the sprite's init agent did not answer a service "
                                 "request") from None
    finally:
        conn.close()
    if reply.startswith(b"error "):
        raise SupervisorError(reply[6:].decode(errors="replace"))
    return reply


async def _simple(sock: Path, fields: Sequence[bytes]) -> None:
    reply = await _call(sock, fields)
    if reply != b"ok":
        raise SystemError_(f"init agent sent a bad reply: {reply[:100]!r}",
                           public="the sprite's init agent sent a bad reply")


def define_request(name: str, argv: Sequence[str], env: Mapping[str, str], cwd: str,
                   uid: int, gid: int, groups: Sequence[int], *, start: bool,
                   log_max: int) -> list[bytes]:
    """The `svc-define` fields; `BadRequest` for a definition the agent would refuse (NUL
    bytes, a bad env name, more than MAX_DEFINITION bytes: the agent keeps every
    definition in its memory reserve)."""
    spawn = _encode_request(argv, env, cwd, uid, gid, groups, False, 24, 80, None)
    if len(spawn) > MAX_DEFINITION:
        raise BadRequest(f"service definition too large ({len(spawn)} bytes with the "
                         f"environment; at most {MAX_DEFINITION})")
    return [b"svc-define", b"name=" + name.encode(), b"start=%d" % int(start),
            b"logdir=" + LOG_DIR.encode(), b"logmax=%d" % log_max, spawn.rstrip(b"\0")]


async def define(sock: Path, request: list[bytes]) -> None:
    """Tell the agent what a service runs (`define_request`); with start=1 it starts (one
    that runs is stopped first and started on the new definition)."""
    await _simple(sock, request)


async def start(sock: Path, name: str) -> None:
    await _simple(sock, [b"svc-start", b"name=" + name.encode()])


async def stop(sock: Path, name: str, timeout: float) -> None:
    """SIGTERM now, SIGKILL after `timeout` seconds; not restarted until started again."""
    await _simple(sock, [b"svc-stop", b"name=" + name.encode(),
                         b"timeout=%d" % int(timeout * 1000)])


async def delete(sock: Path, name: str, timeout: float) -> None:
    """`stop`, then the agent forgets the service."""
    await _simple(sock, [b"svc-delete", b"name=" + name.encode(),
                         b"timeout=%d" % int(timeout * 1000)])


async def signal(sock: Path, name: str, signum: int) -> None:
    await _simple(sock, [b"svc-signal", b"name=" + name.encode(), b"sig=%d" % signum])


async def quiesce(sock: Path) -> None:
    """The sprite is about to stop: no service is restarted from now on (nothing is
    recorded; the next boot starts them as defined)."""
    await _simple(sock, [b"svc-quiesce"])


async def status(sock: Path) -> dict[str, ServiceStatus]:
    """Every service the agent knows, by name."""
    reply = await _call(sock, [b"svc-list"], _LIST_BYTES)
    out: dict[str, ServiceStatus] = {}
    for line in os.fsdecode(reply).splitlines():
        parts = line.split("\t")
        if len(parts) != 8:
            continue
        try:
            st = ServiceStatus(parts[0], parts[1], int(parts[2]), int(parts[3]),
                               int(parts[4]), int(parts[5]), int(parts[6]), parts[7])
        except ValueError:
            continue
        out[st.name] = st
    return out
