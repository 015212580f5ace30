"""The port endpoints as Starlette routes: `WS /proxy` (contract §3.5) and
`WS /ports/watch` (§3.6). They parse, call `wisp.ports` and shape frames; docs/proxy.md.

Close codes: 1000 when the target closed its side (proxy) or the sprite was deleted
(watch); 1008 after an error reply to a bad first message; 1011 after an error reply to a
failed dial, or when the target reset the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from wisp.api.common import as_wisp_error, deny
from wisp.errors import BadRequest
from wisp.network import DialError
from wisp.ports import Ports, pump

__all__ = ["ports_routes", "FIRST_MESSAGE_TIMEOUT"]

log = logging.getLogger("wisp.ports")
#: Error frames go where every other error reply is logged (see `ReplyMiddleware`).
reply_log = logging.getLogger("wisp.replies")

#: How long a proxy client has to send its `{"host","port"}` message.
FIRST_MESSAGE_TIMEOUT = 10.0


async def _next(ws: WebSocket) -> Message | None:
    """The client's next data message, None once it is gone."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        if message["type"] == "websocket.receive":
            return message


async def _close(ws: WebSocket, code: int, reason: str = "") -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        await ws.close(code, reason)


class _PortsApi:
    def __init__(self, ports: Ports) -> None:
        self.ports = ports

    async def proxy(self, ws: WebSocket) -> None:
        name = ws.path_params["name"]
        try:
            await self.ports.wake(name)
        except Exception as exc:
            await deny(ws, as_wisp_error(exc, "the proxy endpoint"))
            return
        await ws.accept()
        try:
            first = await asyncio.wait_for(_next(ws), FIRST_MESSAGE_TIMEOUT)
        except TimeoutError:
            await self._refuse(ws, f"no target message within {FIRST_MESSAGE_TIMEOUT:g} s",
                               1008)
            return
        if first is None:
            return
        try:
            reader, writer, target = await self.ports.dial(
                name, first.get("text") if first.get("text") is not None
                else first.get("bytes"))
        except BadRequest as exc:
            await self._refuse(ws, exc.public_message, 1008)
            return
        except DialError as exc:
            await self._refuse(ws, str(exc), 1011)
            return
        except Exception as exc:
            await self._refuse(ws, as_wisp_error(exc, "the proxy endpoint").public_message,
                               1011)
            return

        async def receive() -> bytes | None:
            while True:
                message = await _next(ws)
                if message is None:
                    return None
                if message.get("bytes") is not None:  # text frames carry nothing here
                    return bytes(message["bytes"])

        try:
            await ws.send_text(json.dumps({"status": "connected", "target": target}))
        except Exception:
            writer.close()
            return
        try:
            hold = self.ports.hold(name)
        except Exception:  # deleted meanwhile
            writer.close()
            await _close(ws, 1011, "the sprite is gone")
            return
        with hold:
            ending = await pump(reader, writer, receive, ws.send_bytes)
        if ending == "target_closed":
            await _close(ws, 1000)
        elif ending == "target_reset":
            await _close(ws, 1011, "the target reset the connection")

    @staticmethod
    async def _refuse(ws: WebSocket, message: str, code: int) -> None:
        reply_log.info("frame WS %s: %s", ws.url.path, message)
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps({"status": "error", "error": message}))
        await _close(ws, code)

    async def watch(self, ws: WebSocket) -> None:
        name = ws.path_params["name"]
        try:
            await self.ports.wake(name)
        except Exception as exc:
            await deny(ws, as_wisp_error(exc, "ports/watch"))
            return
        await ws.accept()
        events = self.ports.watch(name)
        sender = asyncio.create_task(self._send_events(ws, events))
        gone = asyncio.create_task(self._until_gone(ws))
        try:
            done, _ = await asyncio.wait({sender, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, gone):
                task.cancel()
            await asyncio.gather(sender, gone, return_exceptions=True)
            await events.aclose()
        if sender not in done or sender.exception() is None and not sender.result():
            return  # the client left
        if sender.exception() is not None:
            log.error("ports/watch of %s failed", name, exc_info=sender.exception())
            await _close(ws, 1011, "internal server error")
        else:
            await _close(ws, 1000, "the sprite was deleted")

    @staticmethod
    async def _send_events(ws: WebSocket, events: AsyncIterator[dict[str, Any]]) -> bool:
        """Send every event; True when they ended, False when the client was gone."""
        async for event in events:
            try:
                await ws.send_text(json.dumps(event))
            except Exception:
                return False
        return True

    @staticmethod
    async def _until_gone(ws: WebSocket) -> None:
        """Client messages mean nothing here; wait for the client to leave."""
        while await _next(ws) is not None:
            pass


def ports_routes(ports: Ports) -> list[BaseRoute]:
    """The proxy and the port watcher; auth and `Sprite-Version` are the app's job."""
    api = _PortsApi(ports)
    return [
        WebSocketRoute("/v1/sprites/{name}/proxy", api.proxy),
        WebSocketRoute("/v1/sprites/{name}/ports/watch", api.watch),
    ]
