"""Helpers for sprite URL tests: small apps to run inside a sprite, and requests by Host.

The apps use only the Debian image's Python standard library: sprites in the test server
have no network to install anything. This host's resolver need not know `*.localhost`,
so requests go to 127.0.0.1 with the sprite's host in the `Host` header (which is all a
browser resolving `NAME.localhost` to the loopback would do).
"""

from __future__ import annotations

import socket
from typing import Any

import httpx

from tests.framework.server import WispServer

#: Answers every GET/POST/PUT with a JSON echo of what it got: method, path, headers,
#: body length (`/stream?n=N` answers N chunks of 64 KiB, chunked).
ECHO_APP = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if not size:
                    break
                body += chunk
        if self.path.startswith("/stream"):
            count = int(self.path.split("n=")[1])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(count):
                self.wfile.write(b"10000\r\n" + b"x" * 65536 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        out = json.dumps({"method": self.command, "path": self.path,
                          "headers": [[k, v] for k, v in self.headers.items()],
                          "body_len": len(body), "body_head": body[:64].decode("latin-1")
                          }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("Set-Cookie", "app=1; Path=/")
        self.send_header("Set-Cookie", "wisp_url_session=forged-by-app; Path=/")
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = _answer

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

#: A WebSocket echo server (RFC 6455 by hand, stdlib only): text stays text, binary stays
#: binary, fragmented messages are echoed whole, a close is echoed with its code, and the
#: text message "close:CODE" makes the server close with CODE.
WS_ECHO_APP = r'''
import asyncio, base64, hashlib, struct, sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

async def frame(reader):
    b1, b2 = await reader.readexactly(2)
    n = b2 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    mask = await reader.readexactly(4) if b2 & 0x80 else b"\0\0\0\0"
    data = bytearray(await reader.readexactly(n))
    for i in range(n):
        data[i] ^= mask[i % 4]
    return b1 & 0x80, b1 & 0x0F, bytes(data)

def pack(op, data):
    n = len(data)
    head = bytes([0x80 | op])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + data

async def handle(reader, writer):
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip()
               for l in head.split("\r\n")[1:] if ":" in l}
    accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    writer.write(pack(1, ("hello " + head.split(" ")[1]).encode()))
    op0, parts = 0, []
    try:
        while True:
            fin, op, data = await frame(reader)
            if op == 8:
                writer.write(pack(8, data[:2]))
                await writer.drain()
                break
            if op == 9:
                writer.write(pack(10, data))
                continue
            if op in (1, 2):
                op0, parts = op, [data]
            elif op == 0:
                parts.append(data)
            if fin and op in (0, 1, 2):
                msg = b"".join(parts)
                if op0 == 1 and msg.startswith(b"close:"):
                    writer.write(pack(8, struct.pack("!H", int(msg[6:]))))
                    await writer.drain()
                    break
                writer.write(pack(op0, msg))
                await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

asyncio.run(main())
'''


def sh(sprite: Any, script: str) -> tuple[int, str]:
    r = sprite.run("sh", "-c", script, capture_output=True)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def start_app(sprite: Any, source: str, port: int, name: str = "app") -> None:
    """Write `source` into the sprite and run it detached on `port` (it outlives the exec)."""
    path = f"/tmp/{name}-{port}.py"
    code, out = sh(sprite, f"cat > {path} <<'WISP_EOF'\n{source}\nWISP_EOF\n"
                           f"setsid python3 {path} {port} </dev/null >/tmp/{name}-{port}.log "
                           "2>&1 &")
    assert code == 0, out


def start_http_server(sprite: Any, port: int = 8080, directory: str = "/tmp/www") -> None:
    """`python3 -m http.server PORT` serving `directory`, which holds index.html."""
    code, out = sh(sprite, f"mkdir -p {directory} && echo 'hello from {sprite.name}' > "
                           f"{directory}/index.html && cd {directory} && setsid python3 -m "
                           f"http.server {port} --bind 127.0.0.1 </dev/null >/dev/null 2>&1 &")
    assert code == 0, out


def host(server: WispServer, name: str, port: int | None = None) -> str:
    return f"{f'{port}--' if port else ''}{name}.localhost:{server.port}"


def url_get(server: WispServer, host_header: str, path: str = "/", *,
            token: str | None = None, cookie: str | None = None, method: str = "GET",
            headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    """One request to the server with `Host: host_header`; no cookie jar, no redirects."""
    h = {"Host": host_header, **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    if cookie:
        h["Cookie"] = cookie
    with httpx.Client(timeout=60) as c:
        return c.request(method, f"http://127.0.0.1:{server.port}{path}", headers=h, **kw)


def loopback_socket(server: WispServer) -> socket.socket:
    """A socket to the server, for WebSocket clients that would resolve the URL's host."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)
