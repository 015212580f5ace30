"""Connection limits: how long a client may take to send a request head, how long an idle
keep-alive connection stays open, and how many connections may be open at once.

uvicorn's h11 protocol bounds only the idle time after a response (`timeout_keep_alive`):
a client that connects and then sends nothing, or half a request head, holds its socket
forever, and enough of them use up the process's file descriptors. `http_protocol` returns
a subclass that adds the two missing limits:

* **Header timeout.** A new connection must deliver a complete request head within
  `header_timeout` seconds. On a keep-alive connection the idle wait before the next
  request is uvicorn's keep-alive timeout, and the clock starts at the first byte of that
  request. A connection that runs out is closed; if part of a head had arrived, it first
  gets a 408 with the contract's error body. Once a head is in, the limit no longer
  applies: request bodies, long responses and WebSockets (a WebSocket has left this
  protocol once upgraded) are not cut.
* **Connection cap.** A connection that would make more than `max_connections` open at
  once (HTTP and WebSocket together, uvicorn's `server_state.connections`) is answered 503
  with the contract's error body and closed before anything is read from it, so a flood
  costs one short-lived descriptor per attempt.

`fit_fd_limit` makes sure the cap can be reached without running out of descriptors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from wisp.api.app import SPRITE_VERSION

__all__ = ["LimitedH11Protocol", "http_protocol", "fit_fd_limit"]

log = logging.getLogger("wisp.limits")

#: Descriptors one connection may hold: its socket and, for an exec, the agent's socket and
#: the process's pipes.
FDS_PER_CONNECTION = 4
#: Descriptors kept for everything else (the database, sprite start-up, runc and JuiceFS
#: pipes, detached exec sessions): this many, or a quarter of a lower limit.
FDS_RESERVED = 1024


def _reply(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete `Connection: close` HTTP/1.1 reply with the contract's error body."""
    body = json.dumps({"error": code, "message": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            f"sprite-version: {SPRITE_VERSION}\r\n")
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a connection cap (see the module).

    The limits are class attributes so that uvicorn can build the protocol with its usual
    arguments; `http_protocol` makes a subclass that sets them."""

    header_timeout: ClassVar[float] = 10.0
    keep_alive_timeout: ClassVar[float] = 5.0
    max_connections: ClassVar[int] = 1024
    #: When the last refusal was logged: a flood logs one line per 10 s, not one per socket.
    _refusals: ClassVar[int] = 0
    _refusal_logged: ClassVar[float] = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn annotates an int; `call_later` takes any number of seconds.
        self.timeout_keep_alive = self.keep_alive_timeout  # type: ignore[assignment]
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = False  # between requests: the next head has not come yet
        self._head_started = False  # some bytes of that head have arrived

    # -- connection cap -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)  # type: ignore[arg-type]
        self._awaiting_head = True
        self._arm_header_timer()

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # connection_lost() expects one
        transport.write(_reply(503, "Service Unavailable", "too_many_connections",
                               f"the server has {self.max_connections} connections open; "
                               "retry later"))
        transport.close()
        cls = LimitedH11Protocol
        cls._refusals += 1
        now = time.monotonic()
        if now - cls._refusal_logged >= 10:
            log.warning("connection cap (%d) reached: refused %d connection(s) since the "
                        "last such line", self.max_connections, cls._refusals)
            cls._refusals, cls._refusal_logged = 0, now

    # -- header timeout -------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            self.transport.write(_reply(408, "Request Timeout", "request_timeout",
                                        f"no complete request head within "
                                        f"{self.header_timeout:g} s"))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._head_started = True
            if self._header_timer is None:  # first byte of a request on a kept-alive socket
                self._arm_header_timer()
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived and is being answered
            self._head_complete()

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._head_complete()  # the socket now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(event)

    def _head_complete(self) -> None:
        self._cancel_header_timer()
        self._awaiting_head = self._head_started = False

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()  # arms uvicorn's keep-alive timer
        if self.cycle is cycle and not self.transport.is_closing():
            self._awaiting_head = True  # the header clock starts at the next first byte
            if self.conn.trailing_data[0]:  # ... which has already come, pipelined
                self._head_started = True
                self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def http_protocol(header_timeout: float, keep_alive_timeout: float,
                  max_connections: int) -> type[LimitedH11Protocol]:
    """The protocol class to pass as uvicorn's `http=`, with these limits."""

    class WispH11Protocol(LimitedH11Protocol):
        pass

    WispH11Protocol.header_timeout = header_timeout
    WispH11Protocol.keep_alive_timeout = keep_alive_timeout
    WispH11Protocol.max_connections = max_connections
    return WispH11Protocol


def fit_fd_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to what `max_connections` needs (never past the hard
    limit, and only as far as needed: sprites inherit it, and some programs loop over every
    possible descriptor), and return the cap that fits: `max_connections`, or less, with a
    warning, when the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections * FDS_PER_CONNECTION + FDS_RESERVED
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            log.info("raised the open-file limit from %d to %d", soft, new)
            soft = new
    if soft == resource.RLIM_INFINITY or soft >= want:
        return max_connections
    fits = max(16, (soft - min(FDS_RESERVED, soft // 4)) // FDS_PER_CONNECTION)
    if fits >= max_connections:
        return max_connections
    log.warning("open-file limit %d (hard %d) fits %d connections, not the %d configured; "
                "capping at %d", soft, hard, fits, max_connections, fits)
    return fits
