"""The URL proxy: HTTP and WebSocket traffic for `NAME.<domain>` relayed into the sprite.

Every connection to the sprite is a socket opened inside its network namespace
(`Sprites.connect`), so what the sprite serves on its own loopback is reachable and
nothing else is. HTTP goes through one httpcore connection pool (keep-alive to the sprite
when its server allows it) whose network backend dials that way; bodies stream both ways,
never buffered whole. WebSockets are relayed frame by frame with the `websockets` sans-I/O
client over such a socket, so text stays text, binary stays binary, and close codes pass
both ways.

Wake: a dial to a sprite that is cold boots it first; while nothing answers on the port
(a server that is still starting), the dial is retried until `wake_timeout` has passed
since the request came, then the client gets a 502 page. The boot itself is never cut
short by that bound: a half-booted sprite would be worse than a late answer.

The proxy's own replies (401, 404, 502…) are small HTML pages, logged to `wisp.replies`
like the API's error replies, so the suite audits them for host paths and tracebacks.
What the sprite answers is the sprite's business and passes untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import logging
import select
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import httpcore
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.exceptions import ProtocolError as WsProtocolError
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as WsResponse
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from wisp.errors import SpriteNotFound, WispError
from wisp.network import DialError
from wisp.urls.access import COOKIE_NAME, LINK_PARAM, Access, without_cookie
from wisp.urls.hosts import Target, Unroutable, parse_host

if TYPE_CHECKING:
    from wisp.db import SpriteRow
    from wisp.sprites import Sprites

__all__ = ["UrlProxy", "UrlRouter"]

log = logging.getLogger("wisp.urls")
reply_log = logging.getLogger("wisp.replies")

#: Request headers that describe one hop, not the request (RFC 9110 §7.6.1), plus
#: `Expect` (the proxy reads the body itself) and the forwarding headers it sets anew.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect",
    b"host", b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-port"})
#: Response headers that describe one hop.
HOP_BY_HOP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"te",
    b"trailer", b"transfer-encoding", b"upgrade"})
#: Handshake headers the `websockets` client makes itself for the hop to the sprite.
WS_OWN = frozenset({b"sec-websocket-key", b"sec-websocket-version",
                    b"sec-websocket-extensions", b"sec-websocket-protocol"})
#: Idle keep-alive connections to sprites are closed after this many seconds.
KEEPALIVE = 5.0
#: Largest WebSocket message relayed from a sprite (the server's own limit on what it
#: accepts from clients is the same).
WS_MAX_MESSAGE = 32 * 1024 * 1024
NO_TIMEOUT = {"connect": None, "read": None, "write": None, "pool": None}


class NothingListening(Exception):
    """Nothing answered on the port within the wake bound."""


class _SpriteStream(httpcore.AsyncNetworkStream):
    """httpcore's view of a socket inside a sprite (asyncio streams underneath)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            if timeout is None:
                return await self.reader.read(max_bytes)
            return await asyncio.wait_for(self.reader.read(max_bytes), timeout)
        except TimeoutError:
            raise httpcore.ReadTimeout("the sprite did not answer in time") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self.writer.write(buffer)
            await self.writer.drain()
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from None

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # on an idle connection: the sprite closed it (or spoke)
            if self.reader.at_eof() or self.reader.exception() is not None:
                return True
            sock = self.writer.get_extra_info("socket")
            if sock is None or sock.fileno() < 0:
                return True
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        if info == "socket":
            return self.writer.get_extra_info("socket")
        return None


class _SpriteBackend(httpcore.AsyncNetworkBackend):
    """Dials "host" = sprite name, inside that sprite, waking it first."""

    def __init__(self, proxy: UrlProxy) -> None:
        self.proxy = proxy

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        reader, writer = await self.proxy.dial(host, port)
        return _SpriteStream(reader, writer)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("sprites are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def page(status: int, title: str, text: str) -> bytes:
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{status} "
            f"{html.escape(title)}</title></head>\n<body><h1>{html.escape(title)}</h1>\n"
            f"<p>{html.escape(text)}</p></body></html>\n").encode()


class UrlProxy:
    """Answers every request whose `Host` is a sprite URL (see `UrlRouter`)."""

    def __init__(self, sprites: Sprites, access: Access, domain: str,
                 wake_timeout: float) -> None:
        self.sprites = sprites
        self.access = access
        self.domain = domain
        self.wake_timeout = wake_timeout
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=None, max_keepalive_connections=256, keepalive_expiry=KEEPALIVE,
            network_backend=_SpriteBackend(self))
        self._janitor: asyncio.Task[None] | None = None
        self._relays: set[asyncio.StreamWriter] = set()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._janitor = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        """Close every connection into a sprite: an open socket would keep the sprite's
        network namespace alive after the sprite is gone."""
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(BaseException):
                await self._janitor
        for writer in list(self._relays):
            writer.close()
        await self.pool.aclose()

    async def _sweep(self) -> None:
        """Close keep-alive connections that idled out: httpcore only does so when the pool
        is used again, and an idle socket into a stopped sprite pins its namespace."""
        while True:
            await asyncio.sleep(KEEPALIVE)
            for conn in list(self.pool.connections):
                if conn.is_idle() and conn.has_expired():
                    with contextlib.suppress(Exception):
                        await conn.aclose()

    # -- dialing --------------------------------------------------------------------------
    async def dial(self, name: str, port: int
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to `port` in sprite `name` (booted if cold), retried while the port
        refuses, until `wake_timeout` from now; then `NothingListening`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wake_timeout
        delay = 0.02
        while True:
            try:
                reader, writer, _ = await self.sprites.connect(name, "localhost", port)
                return reader, writer
            except DialError:
                if loop.time() + delay >= deadline:
                    raise NothingListening() from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    # -- entry ----------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       target: Target | Unroutable) -> None:
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept",
                                   "websocket.http.response.start", "websocket.close"):
                started = True
            await send(message)

        try:
            await self._serve(scope, receive, watch, target)
        except Exception:
            log.exception("sprite URL %s failed", _describe(scope))
            if not started:
                await self._page(scope, receive, watch, 500, "Internal error",
                                 "The Wisp server failed to relay this request.")

    async def _serve(self, scope: Scope, receive: Receive, send: Send,
                     target: Target | Unroutable) -> None:
        if isinstance(target, Unroutable):
            await self._page(scope, receive, send, 404, "No such sprite",
                             f"{target.host} does not name a sprite.")
            return
        row = self._row(target.name)
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        query = scope.get("query_string", b"")
        links, rest = _split_links(query)
        if links and scope["type"] == "http":
            await self._spend_link(scope, receive, send, row, links[0], rest)
            return
        bearer = self.access.bearer_ok(headers)
        if row is None or not (bearer or row.url_settings.get("auth") == "public"
                               or self.access.session_ok(headers, row.id)):
            if row is None and bearer:
                await self._page(scope, receive, send, 404, "No such sprite",
                                 f"There is no sprite called {target.name}.")
                return
            # The same answer whether or not the sprite exists: a client without the
            # token learns nothing about which names are taken.
            await self._page(
                scope, receive, send, 401, "Authentication required",
                "This sprite URL needs the Wisp API token: send 'Authorization: Bearer "
                "<token>', or open the one-time link `wisp url open NAME` prints.",
                [(b"www-authenticate", b"Bearer")])
            return
        if not target.port_named:
            target = await self._service_target(target, row)
        upstream = self._upstream_headers(scope, target, rest)
        with self.sprites.activity.hold(row.id):  # a relayed request keeps it awake
            if scope["type"] == "http":
                await self._http(scope, receive, send, target, upstream, rest)
            else:
                await self._websocket(scope, receive, send, target, upstream, rest)

    async def _service_target(self, target: Target, row: SpriteRow) -> Target:
        """A host that names no port reaches the service with `http_port`, if the sprite
        has one (docs/services.md); looking it up wakes the sprite, as the dial would."""
        from wisp.services import http_port

        try:
            port = await http_port(self.sprites, row)
        except Exception as exc:  # the dial that follows reports what is wrong
            log.info("looking up the HTTP service of %s failed: %s", target.name, exc)
            return target
        return dataclasses.replace(target, port=port) if port else target

    def _row(self, name: str) -> SpriteRow | None:
        try:
            return self.sprites.row(name)
        except SpriteNotFound:
            return None

    async def _spend_link(self, scope: Scope, receive: Receive, send: Send,
                          row: SpriteRow | None, token: str, rest: bytes) -> None:
        if not self.access.spend_link(token, row.id if row is not None else None):
            await self._page(scope, receive, send, 401, "Link not valid",
                             "This link is unknown, expired or already used. Ask for a new "
                             "one with `wisp url open NAME`.")
            return
        assert row is not None
        location = _raw_path(scope) + (b"?" + rest if rest else b"")
        await send({"type": "http.response.start", "status": 302,
                    "headers": [(b"location", location),
                                (b"set-cookie", self.access.set_cookie_header(row.id)),
                                (b"cache-control", b"no-store"),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def _upstream_headers(self, scope: Scope, target: Target, query: bytes
                          ) -> list[tuple[bytes, bytes]]:
        """The client's headers as the sprite gets them: no hop-by-hop headers, no Wisp
        token, no Wisp cookie; the original Host, and X-Forwarded-* set by the proxy."""
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        named: set[bytes] = set()
        host = b""
        for key, value in headers:
            if key == b"connection":
                named |= {t.strip().lower() for t in value.split(b",")}
            elif key == b"host" and not host:
                host = value
        out: list[tuple[bytes, bytes]] = [(b"host", host or target.host.encode())]
        for key, value in headers:
            if key in HOP_BY_HOP or key in named:
                continue
            if key == b"authorization" and self.access.carries_token(value):
                continue
            if key == b"cookie":
                value = without_cookie(value, COOKIE_NAME)
                if not value:
                    continue
            out.append((key, value))
        client = scope.get("client")
        out += [(b"x-forwarded-for", (client[0] if client else "unknown").encode()),
                (b"x-forwarded-proto", b"https" if scope.get("scheme") in ("https", "wss")
                 else b"http"),
                (b"x-forwarded-host", host or target.host.encode())]
        return out

    # -- HTTP -----------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send, target: Target,
                    upstream: list[tuple[bytes, bytes]], query: bytes) -> None:
        client_headers = scope.get("headers", [])
        has_length = any(k == b"content-length" for k, _ in client_headers)
        chunked = any(k == b"transfer-encoding" for k, _ in client_headers)
        body_done = asyncio.Event()
        gone = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    raise ClientGone()
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    body_done.set()
                    return

        content: bytes | AsyncIterator[bytes] = b""
        if has_length or chunked:
            content = body()
            if chunked and not has_length:
                upstream.append((b"transfer-encoding", b"chunked"))
        else:
            body_done.set()  # nothing to read: the next message is the disconnect
        url = httpcore.URL(scheme=b"http", host=target.name.encode(), port=target.port,
                           target=_raw_path(scope) + (b"?" + query if query else b""))
        request = httpcore.Request(scope["method"].encode(), url, headers=upstream,
                                   content=content, extensions={"timeout": NO_TIMEOUT})
        try:
            response = await self.pool.handle_async_request(request)
        except ClientGone:
            return
        except NothingListening:
            await self._page(scope, receive, send, 502, "Nothing is listening",
                             f"Nothing is listening on port {target.port} in sprite "
                             f"{target.name} (waited {self.wake_timeout:g} s).")
            return
        except SpriteNotFound:
            await self._page(scope, receive, send, 404, "No such sprite",
                             f"There is no sprite called {target.name}.")
            return
        except WispError as exc:
            await self._page(scope, receive, send, exc.status, "Sprite not available",
                             exc.public_message)
            return
        except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
            if gone:
                return
            log.info("sprite URL %s: %s", _describe(scope), exc)
            await self._page(scope, receive, send, 502, "Bad gateway",
                             f"Sprite {target.name} closed the connection on port "
                             f"{target.port} without a complete answer.")
            return
        except httpcore.LocalProtocolError:
            await self._page(scope, receive, send, 400, "Bad request",
                             "The request cannot be relayed to the sprite as it is.")
            return
        try:
            await self._relay_response(scope, receive, send, response, body_done)
        finally:
            await response.aclose()

    async def _relay_response(self, scope: Scope, receive: Receive, send: Send,
                              response: httpcore.Response, body_done: asyncio.Event) -> None:
        headers = [(k.lower(), v) for k, v in response.headers
                   if k.lower() not in HOP_BY_HOP_RESPONSE
                   and not (k.lower() == b"set-cookie" and _sets_cookie(v, COOKIE_NAME))]

        async def stream() -> None:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": headers})
            async for chunk in response.aiter_stream():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        async def disconnected() -> None:
            await body_done.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.create_task(stream())
        watching = asyncio.create_task(disconnected())
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        if streaming.done() and not streaming.cancelled() and streaming.exception():
            # The sprite broke off mid-body. Returning without the last body message makes
            # uvicorn drop the connection: the client must not take what it got for the
            # whole answer.
            log.info("sprite URL %s: answer broken off: %s", _describe(scope),
                     streaming.exception())

    # -- WebSocket ------------------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send, target: Target,
                         upstream: list[tuple[bytes, bytes]], query: bytes) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            reader, writer = await self.dial(target.name, target.port)
        except NothingListening:
            await self._page(scope, receive, send, 502, "Nothing is listening",
                             f"Nothing is listening on port {target.port} in sprite "
                             f"{target.name} (waited {self.wake_timeout:g} s).")
            return
        except WispError as exc:
            await self._page(scope, receive, send, exc.status, "Sprite not available",
                             exc.public_message)
            return
        self._relays.add(writer)
        try:
            await _WsRelay(scope, receive, send, reader, writer, upstream, query).run()
        finally:
            self._relays.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # -- pages ----------------------------------------------------------------------------
    async def _page(self, scope: Scope, receive: Receive, send: Send, status: int,
                    title: str, text: str,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = page(status, title, text)
        reply_log.info("reply %s %s: %s", status, _describe(scope), text)
        headers = [(b"content-type", b"text/html; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store"), *(extra or [])]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008 if status < 500 else 1011})


class ClientGone(Exception):
    """The client went away while its request body was being relayed."""


class _WsRelay:
    """One client WebSocket relayed to one in the sprite, frame for frame."""

    def __init__(self, scope: Scope, receive: Receive, send: Send,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 upstream: list[tuple[bytes, bytes]], query: bytes) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.reader, self.writer = reader, writer
        subprotocols = [Subprotocol(s) for s in scope.get("subprotocols") or []]
        self.proto = ClientProtocol(parse_uri("ws://sprite/"), subprotocols=subprotocols or None,
                                    max_size=WS_MAX_MESSAGE)
        self.upstream = upstream
        self.query = query
        self.client_closed = False
        self.pending: Sequence[object] = ()

    def _flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.writer.write(data)
            elif self.writer.can_write_eof() and not self.writer.is_closing():
                self.writer.write_eof()

    async def run(self) -> None:
        request = self.proto.connect()
        request.path = (_raw_path(self.scope) + (b"?" + self.query if self.query else b"")
                        ).decode("latin-1")
        for key, value in self.upstream:
            if key not in WS_OWN:
                name, text = key.decode("latin-1"), value.decode("latin-1")
                if key == b"host":
                    del request.headers["Host"]
                request.headers[name] = text
        self.proto.send_request(request)
        self._flush()
        response = await self._handshake()
        if response is None:
            return
        if self.proto.handshake_exc is not None or response.status_code != 101:
            await self._deny(response)
            return
        accept: dict[str, Any] = {"type": "websocket.accept",
                                  "subprotocol": self.proto.subprotocol}
        await self.send(accept)
        to_sprite = asyncio.create_task(self._client_to_sprite())
        to_client = asyncio.create_task(self._sprite_to_client())
        try:
            await asyncio.wait({to_sprite, to_client}, return_when=asyncio.FIRST_COMPLETED)
            if to_client.done() and not to_sprite.done():
                # the sprite ended it: give the client's side a moment to see the close
                to_sprite.cancel()
            elif to_sprite.done() and not to_client.done():
                # the client ended it: wait briefly for the sprite's closing frame
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(to_client), 2.0)
        finally:
            for task in (to_sprite, to_client):
                task.cancel()
            await asyncio.gather(to_sprite, to_client, return_exceptions=True)

    async def _handshake(self) -> WsResponse | None:
        while True:
            data = await self.reader.read(65536)
            if data:
                self.proto.receive_data(data)
            else:
                self.proto.receive_eof()
            events = self.proto.events_received()
            for i, event in enumerate(events):
                if isinstance(event, WsResponse):
                    self.pending = events[i + 1:]  # frames that came with the handshake
                    return event
            if not data:
                await self.send({"type": "websocket.close", "code": 1011,
                                 "reason": "the sprite closed the connection"})
                return None

    async def _deny(self, response: WsResponse) -> None:
        """The sprite refused the upgrade: the client gets the sprite's answer."""
        if "websocket.http.response" not in self.scope.get("extensions", {}):
            await self.send({"type": "websocket.close", "code": 1011})
            return
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                   for k, v in response.headers.raw_items()
                   if k.lower().encode() not in HOP_BY_HOP_RESPONSE
                   and k.lower() != "content-length"]
        body = response.body or b""
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({"type": "websocket.http.response.start",
                         "status": response.status_code, "headers": headers})
        await self.send({"type": "websocket.http.response.body", "body": body})

    async def _client_to_sprite(self) -> None:
        while True:
            message = await self.receive()
            kind = message["type"]
            try:
                if kind == "websocket.receive":
                    if message.get("bytes") is not None:
                        self.proto.send_binary(message["bytes"])
                    else:
                        self.proto.send_text((message.get("text") or "").encode())
                elif kind == "websocket.disconnect":
                    self.client_closed = True
                    code = message.get("code", 1005)
                    if code in (1005, 1006, 1015):
                        self.proto.send_close()
                    else:
                        self.proto.send_close(code, message.get("reason") or "")
                    self._flush()
                    await self.writer.drain()
                    return
            except InvalidState:  # the sprite's side is closing already
                return
            self._flush()
            await self.writer.drain()

    async def _sprite_to_client(self) -> None:
        parts: list[bytes] = []
        text = False
        events, self.pending = self.pending, ()
        data = b"-"
        while True:
            for event in events:
                if not isinstance(event, Frame):
                    continue
                if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                    text = event.opcode is Opcode.TEXT
                    parts = [bytes(event.data)]
                elif event.opcode is Opcode.CONT:
                    parts.append(bytes(event.data))
                else:
                    continue
                if event.fin:
                    whole = b"".join(parts)
                    parts = []
                    if text:
                        await self.send({"type": "websocket.send",
                                         "text": whole.decode(errors="replace")})
                    else:
                        await self.send({"type": "websocket.send", "bytes": whole})
            if self.proto.close_rcvd is not None or not data or \
                    isinstance(self.proto.parser_exc, WsProtocolError):
                break
            await self.writer.drain()
            data = await self.reader.read(65536)
            if data:
                self.proto.receive_data(data)
            else:
                self.proto.receive_eof()
            self._flush()
            events = self.proto.events_received()
        if self.client_closed:
            return
        close = self.proto.close_rcvd
        if close is not None and close.code not in (1005, 1006, 1015):
            await self.send({"type": "websocket.close", "code": close.code,
                             "reason": close.reason})
        elif close is not None:
            await self.send({"type": "websocket.close", "code": 1000})
        else:
            await self.send({"type": "websocket.close", "code": 1011,
                             "reason": "the sprite's connection ended"})


class UrlRouter:
    """ASGI middleware, outermost: a request whose `Host` is a sprite URL goes to the URL
    proxy, before authentication and routing of the API; anything else to the API,
    untouched. (The API's bearer check, error bodies and `Sprite-Version` are the API's;
    a sprite's URL has its own rules, docs/urls.md.)"""

    def __init__(self, app: ASGIApp, proxy: UrlProxy) -> None:
        self.app = app
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((v for k, v in scope.get("headers", []) if k == b"host"), None)
            target = parse_host(host.decode("latin-1") if host is not None else None,
                                self.proxy.domain)
            if target is not None:
                await self.proxy(scope, receive, send, target)
                return
        await self.app(scope, receive, send)


def _raw_path(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    if raw:
        return bytes(raw)
    from urllib.parse import quote

    return quote(scope.get("path") or "/").encode()


def _split_links(query: bytes) -> tuple[list[str], bytes]:
    """(the one-time link tokens in a query string, the query string without them)."""
    if LINK_PARAM.encode() not in query:
        return [], query
    from urllib.parse import unquote_plus

    links, kept = [], []
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if unquote_plus(key.decode("latin-1")) == LINK_PARAM:
            links.append(unquote_plus(value.decode("latin-1")))
        elif part:
            kept.append(part)
    return links, b"&".join(kept)


def _sets_cookie(value: bytes, name: str) -> bool:
    return value.split(b";", 1)[0].partition(b"=")[0].strip() == name.encode()


def _describe(scope: Scope) -> str:
    host = next((v for k, v in scope.get("headers", []) if k == b"host"), b"")
    return (f"{scope.get('method', 'WS')} http://{host.decode('latin-1')[:200]}"
            f"{scope.get('path', '')[:200]}")
