"""Helpers shared by the route modules: body parsing, query values, NDJSON streams, and
refusing a WebSocket handshake with the contract's error body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.websockets import WebSocket

from wisp.errors import BadRequest, PayloadTooLarge, WispError

__all__ = ["json_body", "parse_json_object", "query_int", "query_bool", "ndjson",
           "MAX_JSON_BYTES", "as_wisp_error", "deny"]

log = logging.getLogger("wisp.api")

MAX_JSON_BYTES = 1 << 20


async def json_body(request: Request, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The request's JSON object; `{}` for an empty body. Oversized → 413, malformed → 400."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks))


def parse_json_object(raw: bytes | str, what: str = "request body") -> dict[str, Any]:
    """A JSON object from `raw`; `{}` when it is empty. Anything else is a `BadRequest`.

    Nesting deeper than the interpreter's recursion limit (~1000 levels, a few KB of `[`)
    makes the decoder raise RecursionError: that is bad input too, not a server error.
    """
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def query_int(request: Request, key: str, default: int) -> int:
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {key} must be an integer, not {raw!r}") from None


def query_bool(request: Request, key: str, default: bool = False) -> bool:
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise BadRequest(f"query parameter {key} must be true or false, not {raw!r}")


async def ndjson(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Stream progress events as NDJSON, once the first one is ready.

    An operation checks what it needs (the sprite still exists, its lock is held) before
    its first event, so a failure there is raised from here and becomes the reply's status
    (a restore queued behind a delete of its sprite is a 404, not a 200 with an error line).
    The work runs in its own task, apart from the response: a client that disconnects does
    not cancel a checkpoint or restore half way; the work finishes (or fails cleanly) and
    only the report is lost. A failure after the stream started becomes an `error` line.
    """
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        try:
            async for item in events:
                if not started.done():
                    started.set_result(None)
                await queue.put(item)
        except Exception as exc:
            if not started.done():  # before any event: the caller raises it as the reply
                started.set_exception(exc)
                return
            if isinstance(exc, WispError):
                if exc.status >= 500:
                    log.warning("streamed operation failed: %s", exc.message)
                await queue.put({"type": "error", "error": exc.public_message,
                                 "code": exc.code})
            else:  # logged with its traceback here, never sent
                log.exception("streamed operation failed", exc_info=exc)
                await queue.put({"type": "error", "error": "internal server error",
                                 "code": "internal_error"})
        finally:
            if not started.done():
                started.set_result(None)
            await queue.put(None)

    task = asyncio.create_task(work())
    _running.add(task)
    task.add_done_callback(_running.discard)
    await asyncio.shield(started)

    async def body() -> AsyncIterator[bytes]:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield (json.dumps(item) + "\n").encode()

    return StreamingResponse(body(), media_type="application/x-ndjson")


_running: set[asyncio.Task[None]] = set()


def as_wisp_error(exc: Exception, where: str) -> WispError:
    """The reply for a failure before a response started. An unexpected exception is
    logged with its traceback here and answered with a bare 500: its text may name host
    paths or internals, so it never reaches the client."""
    if isinstance(exc, WispError):
        return exc
    log.error("unexpected error in %s", where, exc_info=exc)
    return WispError("internal server error")


async def deny(ws: WebSocket, err: WispError) -> None:
    """Refuse a WebSocket handshake with `err`'s status and body (contract §3.0: the
    Python and Go SDKs parse it into an API error)."""
    try:
        await ws.send_denial_response(JSONResponse(err.body(), status_code=err.status))
    except RuntimeError:
        # Server without the denial extension: the best left is a policy-violation close.
        with contextlib.suppress(Exception):
            await ws.close(1008)
