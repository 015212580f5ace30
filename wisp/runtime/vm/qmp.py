"""A minimal QMP client: the QEMU Machine Protocol, JSON lines over a unix socket.

Only what the VM driver uses: the capabilities handshake, commands and their replies, with
asynchronous events skipped (the driver polls `query-*` rather than waiting for events).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

__all__ = ["QMP", "QMPError"]


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> QMP:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=1 << 22), timeout)
        qmp = cls(reader, writer)
        try:
            await asyncio.wait_for(qmp._read(), timeout)  # the greeting
            await qmp.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            qmp.close()
            raise
        return qmp

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QMPError("QEMU closed its monitor")
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def execute(self, command: str, timeout: float = 30.0, **args: Any) -> Any:
        async with self._lock:
            msg: dict[str, Any] = {"execute": command}
            if args:
                msg["arguments"] = args
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()

            async def reply() -> Any:
                while True:
                    m = await self._read()
                    if "return" in m:
                        return m["return"]
                    if "error" in m:
                        raise QMPError(f"{command}: {m['error'].get('desc', m['error'])}")

            return await asyncio.wait_for(reply(), timeout)

    def close(self) -> None:
        self._writer.close()


def query_status(path: Path, timeout: float = 2.0) -> str | None:
    """`query-status` without an event loop (for the synchronous `Runtime.frozen`); None
    when QEMU does not answer."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            f = s.makefile("rwb")
            f.readline()
            for cmd in (b'{"execute": "qmp_capabilities"}\n', b'{"execute": "query-status"}\n'):
                f.write(cmd)
                f.flush()
                while True:
                    msg = json.loads(f.readline() or b"{}")
                    if not msg:
                        return None
                    if "return" in msg or "error" in msg:
                        break
            ret = msg.get("return")
            return str(ret["status"]) if isinstance(ret, dict) else None
    except (OSError, ValueError, KeyError):
        return None
