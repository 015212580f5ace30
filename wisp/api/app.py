"""The ASGI application: authentication, the contract's error bodies, `Sprite-Version`.

Errors cross the API only as contract JSON bodies: every `WispError` is turned into its
status and body here, an unknown route into a `not_found` body, and anything unexpected into
a bare `internal_error` (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from wisp.errors import FsError, Unauthorized, WispError

__all__ = ["build_app", "SPRITE_VERSION"]

log = logging.getLogger("wisp.api")
#: One line per error reply (see `ReplyMiddleware`).
reply_log = logging.getLogger("wisp.replies")

#: Any release version makes the Go SDK use the path form of attach (contract §3.4).
SPRITE_VERSION = "1.0.0"


class AuthMiddleware:
    """Bearer-token check for every HTTP and WebSocket request, before any routing.

    The 401 reveals nothing: no hint whether the token was missing, malformed or wrong,
    and no hint whether the sprite in the path exists.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = b""
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        err = Unauthorized("missing or invalid bearer token")
        await _refuse(scope, receive, send, JSONResponse(
            err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"}))


async def _refuse(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    """Answer an HTTP request, or refuse a WebSocket handshake, with `response`."""
    if scope["type"] == "http":
        await response(scope, receive, send)
    else:
        await WebSocket(scope, receive, send).send_denial_response(response)


class EncodedSlashMiddleware:
    """A path with an encoded slash (`%2F`) names nothing: 404.

    The contract (§0.1 rule 1) splits a path into segments before decoding them, where
    Starlette decodes first: `/v1/sprites/probe%2Fcheckpoints%2Fv1` would route as
    checkpoint v1 of sprite `probe`, and a DELETE of "a sprite" would delete that
    checkpoint. No Wisp name may contain `/`, so no such path can name anything.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path") or b""
        if scope["type"] in ("http", "websocket") and b"%2f" in raw.lower():
            await _refuse(scope, receive, send, JSONResponse(
                {"error": "not_found",
                 "message": "no such endpoint: a path segment contains an encoded '/'"},
                status_code=404))
            return
        await self.app(scope, receive, send)


class VersionHeaderMiddleware:
    """Adds `Sprite-Version` to every HTTP response, refused WebSocket handshakes included
    (the Go SDK reads it from any)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                headers = list(message.get("headers", []))
                headers.append((b"sprite-version", SPRITE_VERSION.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_version)


class ReplyMiddleware:
    """Every error reply goes to the `wisp.replies` log, and nothing unexpected escapes.

    Logged, as the client got it: each response with status >= 400 (its JSON body), each
    `error` line of an NDJSON stream, each refused WebSocket handshake and each WebSocket
    close other than 1000. The log is what an operator reads when a client reports an
    error, and what the test suite audits for host paths and tracebacks (none may reach a
    client). An exception no handler turned into a reply becomes a bare 500 here, before
    Starlette's last-resort handler would answer it and then drop the connection.
    """

    #: Bodies are logged up to this size (error bodies are small; a cap keeps a huge one
    #: from filling the log).
    LOG_BYTES = 4096

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        what = f"{scope.get('method', 'WS')} {scope.get('path', '')}"
        state: dict[str, Any] = {"status": 0, "ndjson": False, "body": b"", "tail": b""}

        async def watch(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                state["status"] = message["status"]
                headers = dict(message.get("headers", []))
                state["ndjson"] = headers.get(b"content-type", b"").startswith(
                    b"application/x-ndjson")
            elif kind in ("http.response.body", "websocket.http.response.body"):
                self._body(state, message.get("body", b""), what,
                           not message.get("more_body", False))
            elif kind == "websocket.close" and message.get("code", 1000) != 1000:
                reply_log.info("close %s %s: %s", message.get("code"), what,
                               message.get("reason", ""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error on %s", what)
            if state["status"] or scope["type"] != "http":
                raise  # too late for a reply of our own
            body = json.dumps({"error": "internal_error", "message": "internal server error"})
            await watch({"type": "http.response.start", "status": 500,
                         "headers": [(b"content-type", b"application/json"),
                                     (b"sprite-version", SPRITE_VERSION.encode())]})
            await watch({"type": "http.response.body", "body": body.encode()})

    def _body(self, state: dict[str, Any], chunk: bytes, what: str, last: bool) -> None:
        if state["status"] >= 400:
            if len(state["body"]) < self.LOG_BYTES:
                state["body"] += chunk[: self.LOG_BYTES - len(state["body"])]
            if last:
                reply_log.info("reply %s %s: %s", state["status"], what,
                               state["body"].decode(errors="replace"))
        elif state["ndjson"]:
            *lines, state["tail"] = (state["tail"] + chunk).split(b"\n")
            for line in lines:
                if b'"type": "error"' in line or b'"type":"error"' in line:
                    reply_log.info("stream %s %s: %s", state["status"], what,
                                   line[: self.LOG_BYTES].decode(errors="replace"))


async def _wisp_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WispError)
    if exc.status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _fs_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FsError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Allow: every method of every route on this path
        methods: set[str] = set()
        for route in request.app.router.routes:
            if isinstance(route, Route) and route.methods and \
                    route.matches(request.scope)[0] != Match.NONE:
                methods |= route.methods
        headers["Allow"] = ", ".join(sorted(methods))
    return JSONResponse({"error": code, "message": message}, status_code=exc.status_code,
                        headers=headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal_error", "message": "internal server error"},
                        status_code=500)


def build_app(routes: Sequence[BaseRoute], token: str,
              lifespan: Callable[[Starlette], AbstractAsyncContextManager[Any]] | None = None
              ) -> Starlette:
    app = Starlette(
        routes=list(routes),
        lifespan=lifespan,
        exception_handlers={
            WispError: _wisp_error,
            FsError: _fs_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.add_middleware(EncodedSlashMiddleware)
    app.add_middleware(AuthMiddleware, token=token)
    app.add_middleware(VersionHeaderMiddleware)
    app.add_middleware(ReplyMiddleware)
    return app
