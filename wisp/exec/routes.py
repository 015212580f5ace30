"""The Sprites exec API as Starlette routes (contract §2.9, §3.1-§3.4).

Routes only parse, resolve the sprite and shape replies; the session logic lives in
`wisp.exec.sessions`. Errors before a WebSocket upgrade become an HTTP denial carrying the
contract's JSON error body, so Python and Go SDKs surface a proper API error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal as _signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from wisp.api.common import as_wisp_error, deny, parse_json_object
from wisp.errors import NotFound, PayloadTooLarge, WispError
from wisp.exec.params import parse_duration, parse_exec_query, parse_signal, signal_name
from wisp.exec.sessions import Attachment, Session, SessionRegistry
from wisp.runtime.base import SpriteHandle

__all__ = ["exec_routes", "Resolve", "HTTP_EXEC_MAX_STDIN", "WsAttachment", "HttpAttachment"]

Resolve = Callable[[str], Awaitable[SpriteHandle]]

log = logging.getLogger("wisp.exec")

#: Largest stdin body accepted by HTTP exec (contract §2.9).
HTTP_EXEC_MAX_STDIN = 10 * 1024 * 1024
#: After a non-TTY EXIT frame, how long to wait for the client to close first.
EXIT_CLOSE_WAIT = 2.0
_CAPABILITIES = [(b"x-sprite-capabilities", b"signal")]
_EXIT = 3
#: Fire-and-forget tasks, held here because the loop keeps only weak references.
_background: set[asyncio.Task[None]] = set()


def _as_wisp_error(exc: Exception) -> WispError:
    return as_wisp_error(exc, "an exec endpoint")


def _error_response(err: WispError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


_deny = deny


class WsAttachment(Attachment):
    """A WebSocket client, framed by the session's mode (contract §3.1)."""

    def __init__(self, ws: WebSocket, tty: bool) -> None:
        super().__init__()
        self.ws = ws
        self.tty = tty

    async def send_info(self, info: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(info))

    async def send_output(self, stream: int, data: bytes) -> None:
        await self.ws.send_bytes(data if self.tty else bytes((stream,)) + data)

    async def send_exit(self, code: int) -> None:
        if self.tty:
            await self.ws.send_text(json.dumps({"type": "exit", "exit_code": code}))
        else:
            await self.ws.send_bytes(bytes((_EXIT, code & 0xFF)))

    async def send_keepalive(self) -> None:
        await self.ws.send_text('{"type":"keepalive"}')


class HttpAttachment(Attachment):
    """An HTTP exec response: each frame is its own chunk (the JS reader needs that)."""

    #: The JS SDK takes each read of the body as one frame, but a client's HTTP stack may
    #: hand two chunks that arrived together to one read. Frames are therefore spaced at
    #: least this far apart (seen merged without it: stdout + stderr, tests/js).
    FRAME_GAP = 0.005

    def __init__(self, send: Send) -> None:
        super().__init__()
        self._send = send
        self._last = 0.0

    async def send_info(self, info: dict[str, Any]) -> None:
        return None

    async def _frame(self, body: bytes) -> None:
        wait = self._last + self.FRAME_GAP - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await self._send({"type": "http.response.body", "body": body, "more_body": True})
        self._last = time.monotonic()

    async def send_output(self, stream: int, data: bytes) -> None:
        await self._frame(bytes((stream,)) + data)

    async def send_exit(self, code: int) -> None:
        await self._frame(bytes((_EXIT, code & 0xFF)))


class _HttpExecResponse(Response):
    """Streams one session's frames as the response body; the session owns the pace."""

    def __init__(self, session: Session, stdin: bytes | None) -> None:
        # Not Response.__init__: it would add `content-length: 0` and defeat chunking.
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"application/octet-stream")]
        self.session = session
        self.stdin = stdin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        client = HttpAttachment(send)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            await session.attach(client, owner=True)
        except Exception:
            client.alive = False
        finally:
            session.start()
        if self.stdin is not None:
            feeder = asyncio.create_task(_feed(session, self.stdin))
            _background.add(feeder)
            feeder.add_done_callback(_background.discard)
        if not client.alive:
            session.detach(client)
            return
        watcher = asyncio.create_task(_wait_http_disconnect(receive))
        finished = asyncio.create_task(client.done.wait())
        try:
            await asyncio.wait({watcher, finished}, return_when=asyncio.FIRST_COMPLETED)
            # Complete the response even for a client that left (uvicorn then ignores it).
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            for t in (watcher, finished):
                t.cancel()
            session.detach(client)


async def _feed(session: Session, data: bytes) -> None:
    with contextlib.suppress(Exception):
        view = memoryview(data)
        for i in range(0, len(view), 1 << 16):
            await session.write_stdin(bytes(view[i:i + (1 << 16)]))
    session.close_stdin()


async def _wait_http_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _ExecApi:
    def __init__(self, resolve: Resolve, registry: SessionRegistry) -> None:
        self.resolve = resolve
        self.registry = registry

    # ---- WebSocket: run, attach -------------------------------------------------------

    async def exec_ws(self, ws: WebSocket) -> None:
        name = ws.path_params["name"]
        legacy_id = ws.query_params.get("id")
        if legacy_id:
            await self._attach(ws, name, legacy_id)
            return
        try:
            spec = parse_exec_query(ws.query_params)
            handle = await self.resolve(name)
            session = await self.registry.start(handle, spec)
        except Exception as exc:
            await _deny(ws, _as_wisp_error(exc))
            return
        await self._serve(ws, session, owner=True)

    async def attach_ws(self, ws: WebSocket) -> None:
        await self._attach(ws, ws.path_params["name"], ws.path_params["sid"])

    async def _attach(self, ws: WebSocket, name: str, sid: str) -> None:
        try:
            await self.resolve(name)
            session = self.registry.get(name, sid)
        except Exception as exc:
            await _deny(ws, _as_wisp_error(exc))
            return
        await self._serve(ws, session, owner=False)

    async def _serve(self, ws: WebSocket, session: Session, owner: bool) -> None:
        client = WsAttachment(ws, session.tty)
        try:
            await ws.accept(headers=_CAPABILITIES)
            await session.attach(client, owner=owner)
        except Exception:
            client.alive = False
        finally:
            session.start()
        if not client.alive:
            session.detach(client)
            return
        keepalive = asyncio.create_task(self._keepalive(client))
        receiver = asyncio.create_task(self._receive(ws, session))
        finished = asyncio.create_task(client.done.wait())
        try:
            await asyncio.wait({receiver, finished}, return_when=asyncio.FIRST_COMPLETED)
            if client.done.is_set() and client.alive:
                await self._close_after_exit(ws, session, client, receiver)
            elif client.dropped:
                # The server is going away and the process is not: no exit, "try again".
                with contextlib.suppress(Exception):
                    await ws.close(1012)
        finally:
            for t in (keepalive, receiver, finished):
                t.cancel()
            await asyncio.gather(keepalive, receiver, finished, return_exceptions=True)
            session.detach(client)

    async def _close_after_exit(self, ws: WebSocket, session: Session, client: Attachment,
                                receiver: asyncio.Task[None]) -> None:
        """TTY: close at once, code 1000 for exit 0 else 4000+code (JS reads only this).
        Non-TTY: clients close right after EXIT; give them a moment, then close 1000."""
        code = client.exit_code or 0
        if session.tty:
            close_code = 1000 if code == 0 else 4000 + (code & 0xFF)
        else:
            close_code = 1000
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(receiver), EXIT_CLOSE_WAIT)
            if receiver.done():
                return
        with contextlib.suppress(Exception):
            await ws.close(close_code)

    async def _keepalive(self, client: Attachment) -> None:
        interval = self.registry.keepalive_interval
        if interval <= 0:
            return
        while client.alive and not client.done.is_set():
            await asyncio.sleep(interval)
            await client.keepalive()

    async def _receive(self, ws: WebSocket, session: Session) -> None:
        """Client input until the client goes away: stdin frames, resize, signal."""
        while True:
            message = await ws.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind != "websocket.receive":
                continue
            data = message.get("bytes")
            text = message.get("text")
            if data is not None:
                await self._on_binary(session, data)
            elif text is not None:
                await self._on_text(session, text)

    async def _on_binary(self, session: Session, data: bytes) -> None:
        if not data:
            return
        if session.tty:
            await session.write_stdin(data)
        elif data[0] == 0:
            await session.write_stdin(data[1:])
        elif data[0] == 4:
            session.close_stdin()

    async def _on_text(self, session: Session, text: str) -> None:
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind == "resize":
            rows, cols = msg.get("rows"), msg.get("cols")
            ok = [v for v in (rows, cols) if v is not None]
            if all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in ok):
                session.resize(rows, cols)
        elif kind == "signal":
            with contextlib.suppress(WispError):
                await session.signal(parse_signal(msg.get("signal")))

    # ---- HTTP: list, kill, HTTP exec ---------------------------------------------------

    async def list_sessions(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=200)
        name = request.path_params["name"]
        try:
            await self.resolve(name)
        except Exception as exc:
            return _error_response(_as_wisp_error(exc))
        return JSONResponse({"sessions": [s.listing() for s in self.registry.sessions(name)]})

    async def kill(self, request: Request) -> Response:
        name, sid = request.path_params["name"], request.path_params["sid"]
        try:
            body = parse_json_object(await request.body(), "kill body")
            q = request.query_params
            signum = parse_signal(q.get("signal") or body.get("signal"))
            timeout = parse_duration(q.get("timeout") or body.get("timeout"), 10.0)
            await self.resolve(name)
            session = self.registry.get_running(name, sid)
        except Exception as exc:
            return _error_response(_as_wisp_error(exc))
        return StreamingResponse(_kill_events(session, signum, timeout),
                                 media_type="application/x-ndjson")

    async def http_exec(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            spec = parse_exec_query(request.query_params, force_tty=False)
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > HTTP_EXEC_MAX_STDIN:
                raise PayloadTooLarge(f"stdin body over {HTTP_EXEC_MAX_STDIN} bytes")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > HTTP_EXEC_MAX_STDIN:
                    raise PayloadTooLarge(f"stdin body over {HTTP_EXEC_MAX_STDIN} bytes")
            want_stdin = bool(body) or request.query_params.get("stdin", "").lower() == "true"
            spec = dataclasses.replace(spec, stdin=want_stdin)
            handle = await self.resolve(name)
            session = await self.registry.start(handle, spec)
        except Exception as exc:
            return _error_response(_as_wisp_error(exc))
        return _HttpExecResponse(session, bytes(body) if want_stdin else None)

    async def control_ws(self, ws: WebSocket) -> None:
        """Control mode is not offered: a 404 makes every SDK fall back to direct exec."""
        await _deny(ws, NotFound("the control channel is not supported by this server"))


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


async def _kill_events(session: Session, signum: int, timeout: float) -> AsyncIterator[bytes]:
    """NDJSON progress of a kill (contract §2.9)."""
    name = signal_name(signum)
    pid = session.pid
    yield _line({"type": "signal", "message": f"Signaling {name} to process group {pid}",
                 "signal": name, "pid": pid})
    await session.signal(signum)
    if timeout <= 0:
        yield _line({"type": "complete", "message": f"{name} sent"})
        return
    try:
        code = await asyncio.wait_for(asyncio.shield(session.wait_process()), timeout)
    except TimeoutError:
        yield _line({"type": "timeout",
                     "message": f"Timeout after {_fmt_seconds(timeout)}, sending SIGKILL"})
        await session.signal(_signal.SIGKILL)
        try:
            code = await asyncio.wait_for(asyncio.shield(session.wait_process()), 10.0)
        except TimeoutError:
            yield _line({"type": "error", "message": "process did not exit after SIGKILL"})
            return
        yield _line({"type": "killed", "message": "Process killed"})
    else:
        yield _line({"type": "exited", "message": "Process exited"})
    yield _line({"type": "complete", "exit_code": code})


def exec_routes(resolve: Resolve, registry: SessionRegistry) -> list[BaseRoute]:
    """Every exec endpoint. `resolve(name)` wakes the sprite and returns its handle, or
    raises `SpriteNotFound`; auth and `Sprite-Version` are the app's middleware's job."""
    api = _ExecApi(resolve, registry)
    return [
        WebSocketRoute("/v1/sprites/{name}/exec", api.exec_ws),
        Route("/v1/sprites/{name}/exec", api.list_sessions, methods=["GET", "HEAD"]),
        Route("/v1/sprites/{name}/exec", api.http_exec, methods=["POST"]),
        WebSocketRoute("/v1/sprites/{name}/exec/{sid}", api.attach_ws),
        Route("/v1/sprites/{name}/exec/{sid}/kill", api.kill, methods=["POST"]),
        WebSocketRoute("/v1/sprites/{name}/control", api.control_ws),
    ]
