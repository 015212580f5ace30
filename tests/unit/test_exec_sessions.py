"""Exec sessions and the Sprites exec API, end to end.

A busybox sprite runs in a real runc container; a real uvicorn server (a subprocess, so its
memory can be measured on its own) serves only the exec routes; the official `sprites` SDK
and raw WebSocket/HTTP clients drive it. A few tests use `SessionRegistry` in-process to
check the pipe-to-client backpressure precisely.

Run as a script (`python test_exec_sessions.py serve NAME ROOTFS SOCKET FD KEEPALIVE`) this
file is that test server.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.framework.container import BusyboxSprite, build_init, busybox_sprite
from tests.framework.processes import stop
from wisp.exec.sessions import CHUNK, Attachment, ExecSpec, SessionRegistry

REPO = Path(__file__).resolve().parents[2]
NAME = "t1"
KEEPALIVE = 0.5


# ---- the test server ---------------------------------------------------------------------

def _serve(argv: list[str]) -> None:
    """A tiny app made of the exec routes, plus two test hooks into the registry."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from wisp.errors import SpriteNotFound
    from wisp.exec import SessionRegistry, exec_routes
    from wisp.runtime.base import SpriteHandle

    name, rootfs, sock, fd, keepalive = argv
    handle = SpriteHandle(name=name, rootfs=Path(rootfs), agent_socket=Path(sock))
    registry = SessionRegistry(keepalive_interval=float(keepalive))

    async def resolve(n: str) -> SpriteHandle:
        if n != name:
            raise SpriteNotFound(n)
        return handle

    async def close_sprite(request: Request) -> JSONResponse:
        await registry.close_sprite(request.path_params["name"])
        return JSONResponse({})

    async def active(request: Request) -> JSONResponse:
        return JSONResponse({"active": registry.active(request.path_params["name"])})

    app = Starlette(routes=[
        *exec_routes(resolve, registry),
        Route("/_test/close_sprite/{name}", close_sprite, methods=["POST"]),
        Route("/_test/active/{name}", active),
    ])
    uvicorn.run(app, fd=int(fd), log_level="warning")


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(sys.argv[2:])
    sys.exit(0)


# ---- fixtures ----------------------------------------------------------------------------

@dataclass
class Server:
    port: int
    pid: int
    sprite: BusyboxSprite

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str, params: list[tuple[str, str]] | None = None) -> str:
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{urlencode(params)}" if params else "")


@pytest.fixture(scope="module")
def sprite() -> Iterator[BusyboxSprite]:
    with tempfile.TemporaryDirectory(prefix="wisp-init-") as d:
        init = build_init(Path(d) / "wisp-init")
        with busybox_sprite(NAME, init=init) as s:
            yield s


@pytest.fixture(scope="module")
def server(sprite: BusyboxSprite) -> Iterator[Server]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, __file__, "serve", NAME, str(sprite.handle.rootfs),
         str(sprite.handle.agent_socket), str(listener.fileno()), str(KEEPALIVE)],
        pass_fds=[listener.fileno()], env=env, stdin=subprocess.DEVNULL)
    listener.close()
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                url = f"http://127.0.0.1:{port}/v1/sprites/{NAME}/exec"
                if httpx.head(url).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield Server(port, proc.pid, sprite)
    finally:
        stop(proc)


@pytest.fixture
def sp(server: Server) -> Any:
    from sprites import SpritesClient

    client = SpritesClient("test-token", base_url=server.base)
    yield client.sprite(NAME)
    client.close()


# ---- raw WebSocket helpers ---------------------------------------------------------------

def _exec_params(*argv: str, **extra: str) -> list[tuple[str, str]]:
    params = [("cmd", a) for a in argv] + [("path", argv[0])]
    params += list(extra.items())
    return params


async def _frames_until_exit(ws: Any, tty: bool = False) -> list[str | bytes]:
    """Every message after session_info up to and including the exit."""
    frames: list[str | bytes] = []
    while True:
        msg = await asyncio.wait_for(ws.recv(), 15)
        frames.append(msg)
        if isinstance(msg, bytes) and not tty and msg[:1] == b"\x03":
            return frames
        if isinstance(msg, str) and json.loads(msg).get("type") == "exit":
            return frames


def _stream(frames: list[str | bytes], sid: int) -> bytes:
    return b"".join(f[1:] for f in frames if isinstance(f, bytes) and f[:1] == bytes((sid,)))


async def _start_detached(server: Server, *argv: str, **extra: str) -> dict[str, Any]:
    """Start a command over WS, read session_info, and leave (the command runs on)."""
    from websockets.asyncio.client import connect

    # close_timeout=0 like the SDK: a client that stops reading cannot finish a close
    # handshake behind the output still queued for it.
    async with connect(server.ws(f"/v1/sprites/{NAME}/exec", _exec_params(*argv, **extra)),
                       close_timeout=0) as ws:
        info = json.loads(await ws.recv())
    return info


def _denial(server: Server, path: str, params: list[tuple[str, str]] | None = None
            ) -> tuple[int, dict[str, Any]]:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def go() -> tuple[int, dict[str, Any]]:
        try:
            async with connect(server.ws(path, params)):
                pass
        except InvalidStatus as e:
            return e.response.status_code, json.loads(e.response.body or b"{}")
        raise AssertionError("upgrade was accepted")

    return asyncio.run(go())


def test_public_surface() -> None:
    """The exec package and the agent client export exactly their documented names."""
    import wisp.exec
    import wisp.runtime.agent

    assert sorted(wisp.exec.__all__) == ["ExecSpec", "Resolve", "Session", "SessionRegistry",
                                         "exec_routes"]
    assert sorted(wisp.runtime.agent.__all__) == ["AGENT_LOST_EXIT", "AgentProcess",
                                                  "FdReader", "FdWriter", "MAX_REQUEST", "adopt",
                                                  "join_cgroups", "list_orphans", "spawn",
                                                  "wait_ready"]
    for mod in (wisp.exec, wisp.runtime.agent):
        assert all(hasattr(mod, n) for n in mod.__all__)


# ---- the SDK scenarios (contract §6.1, §6.2) ---------------------------------------------

def test_echo(sp: Any) -> None:
    """`echo hello world` returns exactly its output."""
    assert sp.command("echo", "hello", "world").output() == b"hello world\n"


def test_default_dir_is_home(sp: Any) -> None:
    """Without `dir` the command runs in /home/sprite."""
    assert sp.command("pwd").output() == b"/home/sprite\n"


def test_env_on_top_of_defaults(sp: Any) -> None:
    """Request env is added to the default PATH/HOME/USER/TERM/LANG environment."""
    out = sp.command("env", env={"TEST_VAR": "hello", "ANOTHER_VAR": "world"}).output()
    lines = set(out.decode().splitlines())
    assert {"TEST_VAR=hello", "ANOTHER_VAR=world", "HOME=/home/sprite", "USER=sprite",
            "LANG=C.UTF-8"} <= lines
    assert any(line.startswith("PATH=/usr/local/sbin:") for line in lines)
    assert any(line.startswith("TERM=") for line in lines)


def test_dir(sp: Any) -> None:
    """`dir=/tmp` is the working directory."""
    assert sp.command("pwd", cwd="/tmp").output() == b"/tmp\n"


def test_exit_code(sp: Any) -> None:
    """A non-zero exit reaches the SDK as ExecError with that code."""
    from sprites.exceptions import ExecError

    with pytest.raises(ExecError) as e:
        sp.command("sh", "-c", "exit 42").run()
    assert e.value.exit_code() == 42


def test_stdin_pipe(sp: Any) -> None:
    """SDK stdin is fed to the command and ends with EOF."""
    data = b"hello from pipe test\n" * 500
    assert sp.command("cat", stdin=io.BytesIO(data)).output() == data


def test_tty(sp: Any) -> None:
    """With a TTY, `tty` names a /dev/pts device."""
    assert b"/dev/pts/" in sp.command("tty", tty=True).output()


def test_no_tty(sp: Any) -> None:
    """Without a TTY, `tty` prints `not a tty` on stdout and exits 1."""
    from sprites.exceptions import ExecError

    with pytest.raises(ExecError) as e:
        sp.command("tty").combined_output()
    assert e.value.exit_code() == 1
    assert b"not a tty" in e.value.stdout


def test_tty_size(sp: Any) -> None:
    """The PTY has 24x80 by default and the requested size otherwise, from the start."""
    assert sp.command("sh", "-c", "stty size", tty=True).output().strip() == b"24 80"
    out = sp.command("sh", "-c", "stty size", tty=True, tty_rows=40, tty_cols=100).output()
    assert out.strip() == b"40 100"


def test_stdout_stderr_separate(sp: Any) -> None:
    """stdout and stderr stay separate streams."""
    r = sp.run("sh", "-c", "echo stdout; echo stderr >&2", capture_output=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"stdout\n", b"stderr\n")


def test_command_not_found(sp: Any) -> None:
    """A missing program ends like in a shell: 127 and a message on stderr."""
    from sprites.exceptions import ExecError

    with pytest.raises(ExecError) as e:
        sp.command("no-such-program").run()
    assert e.value.exit_code() == 127
    assert b"command not found" in e.value.stderr


def test_session_list_and_attach_replays_earlier_output(server: Server, sp: Any) -> None:
    """A command keeps running after its client leaves; it is listed, and an attach gets
    the output printed before the attach, then the rest, then the exit."""
    info = asyncio.run(_start_detached(server, "sh", "-c", "echo before; sleep 1; echo after"))
    assert info["type"] == "session_info" and info["is_owner"] is True
    time.sleep(0.2)
    sessions = sp.list_sessions()
    mine = [s for s in sessions if "sleep 1" in s.command]
    assert [s.id for s in mine] == [info["session_id"]]
    assert mine[0].workdir == "/home/sprite" and mine[0].tty is False
    raw = httpx.get(f"{server.base}/v1/sprites/{NAME}/exec").json()["sessions"]
    item = next(s for s in raw if s["id"] == info["session_id"])
    assert isinstance(item["id"], str) and item["is_active"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", item["created"])
    assert sp.attach_session(info["session_id"]).output() == b"before\nafter\n"


def test_tty_session_reattach(server: Server, sp: Any) -> None:
    """A detached TTY session is attached in TTY mode (from session_info) with its replay."""
    script = "echo tty-before; sleep 1; echo tty-after"
    info = asyncio.run(_start_detached(server, "sh", "-c", script, tty="true"))
    assert info["tty"] is True
    time.sleep(0.2)
    out = sp.attach_session(info["session_id"]).output()
    assert out == b"tty-before\r\ntty-after\r\n"


def test_concurrent_commands(sp: Any) -> None:
    """Many execs at once each get their own output and exit code."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple[int, bytes, int]:
        r = sp.run("sh", "-c", f"echo {i}; exit {i % 5}", capture_output=True)
        return i, r.stdout, r.returncode

    with ThreadPoolExecutor(16) as pool:
        for i, out, code in pool.map(one, range(40)):
            assert (out, code) == (f"{i}\n".encode(), i % 5)


def test_client_vanishing_mid_stream_leaves_command_running(server: Server) -> None:
    """A client that drops mid-stream detaches: the command is no longer held back, runs to
    its end, and the server's memory stays bounded by the ring."""
    from websockets.asyncio.client import connect

    async def go() -> str:
        url = server.ws(f"/v1/sprites/{NAME}/exec",
                        _exec_params("head", "-c", "60000000", "/dev/zero"))
        ws = await connect(url)
        info = json.loads(await ws.recv())
        for _ in range(5):
            await ws.recv()
        ws.transport.abort()
        return str(info["session_id"])

    sid = asyncio.run(go())
    deadline = time.monotonic() + 20
    while sid in [s["id"] for s in
                  httpx.get(f"{server.base}/v1/sprites/{NAME}/exec").json()["sessions"]]:
        assert time.monotonic() < deadline, "detached command did not finish"
        time.sleep(0.1)
    assert _rss_kb(server.pid, "VmRSS") < 150_000


def test_client_that_closes_without_reading_releases_the_command(server: Server) -> None:
    """A client that sends its close frame but never reads (its TCP stays open, the
    server's send buffer full) is dropped at once: the command is not held back."""
    query = urlencode(_exec_params("head", "-c", "20000000", "/dev/zero"))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", server.port))
        s.sendall((f"GET /v1/sprites/{NAME}/exec?{query} HTTP/1.1\r\nHost: x\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        time.sleep(0.5)  # let the server fill its buffers
        s.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # masked close 1000, never read
        sessions = lambda: httpx.get(  # noqa: E731
            f"{server.base}/v1/sprites/{NAME}/exec").json()["sessions"]
        deadline = time.monotonic() + 10
        while any("head -c 20000000" in x["command"] for x in sessions()):
            assert time.monotonic() < deadline, "command still held back by a gone client"
            time.sleep(0.1)


def test_kill_session(server: Server, sp: Any) -> None:
    """Kill sends the signal and streams signal/exited/complete; an exited session is 410,
    an unknown one 404."""
    from sprites.exceptions import APIError
    from sprites.session import kill_session

    info = asyncio.run(_start_detached(server, "sleep", "100"))
    events = list(kill_session(sp, info["session_id"]))
    assert [e.type for e in events] == ["signal", "exited", "complete"]
    with pytest.raises(APIError) as e:
        kill_session(sp, info["session_id"])
    assert e.value.status_code == 410
    with pytest.raises(APIError) as e:
        kill_session(sp, "999999")
    assert e.value.status_code == 404


def test_100mb_output_streams_complete_with_bounded_server_memory(server: Server,
                                                                  sp: Any) -> None:
    """100 MB of output reaches the SDK byte for byte while the server's peak RSS grows by
    far less than the data (output is read only as fast as the client takes it)."""
    with open(f"/proc/{server.pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    base = _rss_kb(server.pid, "VmHWM")
    out = sp.command("head", "-c", "100000000", "/dev/zero").output()
    peak = _rss_kb(server.pid, "VmHWM")
    assert len(out) == 100_000_000
    assert out.count(0) == 100_000_000
    assert peak - base < 40_000, f"server peak RSS grew by {peak - base} kB"


def _rss_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


# ---- wire details (contract §3.1-§3.4, §2.9) ---------------------------------------------

def test_non_tty_framing_and_close(server: Server) -> None:
    """Non-TTY: session_info first, the capability header, 01/02 frames, then `03 code`
    last; a client that does not close is closed by the server with 1000."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async def go() -> None:
        url = server.ws(f"/v1/sprites/{NAME}/exec",
                        _exec_params("sh", "-c", "echo out; echo err >&2; exit 7"))
        async with connect(url) as ws:
            assert ws.response.headers["X-Sprite-Capabilities"] == "signal"
            info = json.loads(await ws.recv())
            assert info["type"] == "session_info" and info["tty"] is False
            assert isinstance(info["session_id"], str) and isinstance(info["created"], int)
            frames = await _frames_until_exit(ws)
            assert frames[-1] == b"\x03\x07"
            assert _stream(frames, 1) == b"out\n" and _stream(frames, 2) == b"err\n"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1000

    asyncio.run(go())


@pytest.mark.parametrize("code,close_code", [(0, 1000), (3, 4003)])
def test_tty_exit_message_and_close_code(server: Server, code: int, close_code: int) -> None:
    """TTY: raw output, then {"type":"exit"}, then the server closes: 1000 for 0, else
    4000+code."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async def go() -> None:
        url = server.ws(f"/v1/sprites/{NAME}/exec",
                        _exec_params("sh", "-c", f"printf hi; exit {code}", tty="true"))
        async with connect(url) as ws:
            info = json.loads(await ws.recv())
            assert info["tty"] is True and (info["rows"], info["cols"]) == (24, 80)
            frames = await _frames_until_exit(ws, tty=True)
            assert b"".join(f for f in frames if isinstance(f, bytes)) == b"hi"
            assert json.loads(frames[-1]) == {"type": "exit", "exit_code": code}
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == close_code

    asyncio.run(go())


def test_stdin_frames_and_eof(server: Server) -> None:
    """`00`+data is stdin and a lone `04` is EOF."""
    from websockets.asyncio.client import connect

    async def go() -> None:
        async with connect(server.ws(f"/v1/sprites/{NAME}/exec",
                                     _exec_params("cat", stdin="true"))) as ws:
            await ws.recv()
            await ws.send(b"\x00hello")
            await ws.send(b"\x00 world")
            await ws.send(b"")
            await ws.send(b"\x04")
            frames = await _frames_until_exit(ws)
            assert _stream(frames, 1) == b"hello world" and frames[-1] == b"\x03\x00"

    asyncio.run(go())


def test_stdin_false_is_dev_null(server: Server) -> None:
    """`stdin=false`: the command sees an ended stdin without any EOF frame."""
    from websockets.asyncio.client import connect

    async def go() -> None:
        async with connect(server.ws(f"/v1/sprites/{NAME}/exec",
                                     _exec_params("cat", stdin="false"))) as ws:
            await ws.recv()
            frames = await _frames_until_exit(ws)
            assert frames == [b"\x03\x00"]

    asyncio.run(go())


def test_signal_message(server: Server) -> None:
    """{"type":"signal","signal":"TERM"} reaches the process: exit 143."""
    from websockets.asyncio.client import connect

    async def go() -> None:
        async with connect(server.ws(f"/v1/sprites/{NAME}/exec",
                                     _exec_params("sleep", "100"))) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "signal", "signal": "TERM"}))
            frames = await _frames_until_exit(ws)
            assert frames[-1] == bytes((3, 143))

    asyncio.run(go())


def test_resize_message(server: Server) -> None:
    """{"type":"resize"} changes the PTY size seen by the running program."""
    from websockets.asyncio.client import connect

    async def go() -> None:
        async with connect(server.ws(f"/v1/sprites/{NAME}/exec",
                                     _exec_params("sh", "-c", "read x; stty size",
                                                  tty="true"))) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            await ws.send(b"go\n")
            frames = await _frames_until_exit(ws, tty=True)
            out = b"".join(f for f in frames if isinstance(f, bytes))
            assert out.endswith(b"40 120\r\n")

    asyncio.run(go())


def test_keepalive_on_silent_commands(server: Server) -> None:
    """A silent command still gets periodic {"type":"keepalive"} text frames."""
    from websockets.asyncio.client import connect

    async def go() -> None:
        async with connect(server.ws(f"/v1/sprites/{NAME}/exec",
                                     _exec_params("sleep", "1.3"))) as ws:
            await ws.recv()
            frames = await _frames_until_exit(ws)
            assert '{"type":"keepalive"}' in frames
            assert frames[-1] == b"\x03\x00"

    asyncio.run(go())


def test_attach_forms_and_two_clients(server: Server) -> None:
    """Legacy `?id=` attach works, the attacher gets session_info (not owner) and the
    replay, and both clients see live output and the exit; stdin from either reaches it."""
    from websockets.asyncio.client import connect

    async def go() -> None:
        url = server.ws(f"/v1/sprites/{NAME}/exec",
                        _exec_params("sh", "-c", "echo one; read x; echo two $x"))
        async with connect(url) as owner:
            info = json.loads(await owner.recv())
            assert await owner.recv() == b"\x01one\n"
            legacy = server.ws(f"/v1/sprites/{NAME}/exec", [("id", info["session_id"]),
                                                            ("stdin", "true")])
            async with connect(legacy) as other:
                other_info = json.loads(await other.recv())
                assert other_info["is_owner"] is False
                assert other_info["session_id"] == info["session_id"]
                assert await other.recv() == b"\x01one\n"
                await other.send(b"\x00x\n")
                a, b = await asyncio.gather(_frames_until_exit(owner),
                                            _frames_until_exit(other))
                for frames in (a, b):
                    assert _stream(frames, 1) == b"two x\n" and frames[-1] == b"\x03\x00"

    asyncio.run(go())


def test_attach_after_exit_and_ring_limit(server: Server) -> None:
    """Output made while nobody is attached goes into a 1 MiB ring: an attach replays
    exactly its newest 1 MiB, then (the command having exited meanwhile) the exit."""
    from websockets.asyncio.client import connect

    async def go() -> None:
        info = await _start_detached(server, "sh", "-c", "head -c 3000000 /dev/zero; echo END")
        await asyncio.sleep(1.0)
        path = f"/v1/sprites/{NAME}/exec/{info['session_id']}"
        async with connect(server.ws(path, [("stdin", "true")])) as ws:
            assert json.loads(await ws.recv())["type"] == "session_info"
            frames = await _frames_until_exit(ws)
        out = _stream(frames, 1)
        assert len(out) == 1 << 20 and out.endswith(b"\0END\n")
        assert frames[-1] == b"\x03\x00"

    asyncio.run(go())


def test_denials_carry_contract_bodies(server: Server) -> None:
    """Errors before the upgrade are HTTP answers with the contract's JSON body."""
    status, body = _denial(server, "/v1/sprites/nope/exec", _exec_params("true"))
    assert (status, body["error"]) == (404, "sprite_not_found")
    status, body = _denial(server, f"/v1/sprites/{NAME}/exec",
                           _exec_params("true", tty="true", rows="abc"))
    assert (status, body["error"]) == (400, "bad_request")
    status, body = _denial(server, f"/v1/sprites/{NAME}/exec", [("cmd", "env"),
                                                               ("env", "NOEQUALS")])
    assert status == 400
    status, body = _denial(server, f"/v1/sprites/{NAME}/exec/987654")
    assert (status, body["error"]) == (404, "session_not_found")
    status, body = _denial(server, f"/v1/sprites/{NAME}/exec", [("id", "987654")])
    assert (status, body["error"]) == (404, "session_not_found")
    status, body = _denial(server, f"/v1/sprites/{NAME}/control")
    assert status == 404 and body["error"] == "not_found"


def test_rest_edges(server: Server) -> None:
    """HEAD answers 200; listing an unknown sprite is 404; kill parses query forms and
    escalates to SIGKILL after its timeout; timeout=0 only signals."""
    assert httpx.head(f"{server.base}/v1/sprites/{NAME}/exec").status_code == 200
    r = httpx.get(f"{server.base}/v1/sprites/nope/exec")
    assert r.status_code == 404 and r.json()["error"] == "sprite_not_found"

    info = asyncio.run(_start_detached(server, "sh", "-c", "trap '' TERM; sleep 100; :"))
    time.sleep(0.2)
    url = f"{server.base}/v1/sprites/{NAME}/exec/{info['session_id']}/kill"
    r = httpx.post(url, params={"signal": "TERM", "timeout": "300ms"}, timeout=20)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in r.text.splitlines()]
    assert [e["type"] for e in events] == ["signal", "timeout", "killed", "complete"]
    assert events[0]["signal"] == "SIGTERM" and events[-1]["exit_code"] == 137

    info = asyncio.run(_start_detached(server, "sleep", "100"))
    url = f"{server.base}/v1/sprites/{NAME}/exec/{info['session_id']}/kill"
    r = httpx.post(url, params={"signal": "sigint", "timeout": "0s"})
    assert [json.loads(line)["type"] for line in r.text.splitlines()] == ["signal", "complete"]
    assert httpx.post(url, params={"signal": "NOPE"}).status_code == 400
    time.sleep(0.3)
    assert httpx.post(url).status_code == 410


def _http_exec(server: Server, query: list[tuple[str, str]], body: bytes = b""
               ) -> tuple[int, list[bytes]]:
    """POST /exec over a raw socket; returns the status and the body's HTTP chunks."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        head = (f"POST /v1/sprites/{NAME}/exec?{urlencode(query)} HTTP/1.1\r\n"
                f"Host: x\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    status = int(header.split()[1])
    assert b"transfer-encoding: chunked" in header.lower()
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return status, chunks
        chunks.append(rest[:size])
        rest = rest[size + 2:]


def test_http_exec(server: Server) -> None:
    """POST exec streams one frame per HTTP chunk (01/02 + data), ending with `03 code`;
    the body is the command's stdin; a body over 10 MiB is refused with 413."""
    status, chunks = _http_exec(server, _exec_params("sh", "-c", "echo out; echo err >&2; exit 5"))
    assert status == 200
    assert chunks[-1] == b"\x03\x05"
    assert all(c[:1] in (b"\x01", b"\x02") for c in chunks[:-1])
    assert b"".join(c[1:] for c in chunks if c[:1] == b"\x01") == b"out\n"
    assert b"".join(c[1:] for c in chunks if c[:1] == b"\x02") == b"err\n"

    status, chunks = _http_exec(server, _exec_params("cat", stdin="true"), b"piped body")
    assert (status, chunks) == (200, [b"\x01piped body", b"\x03\x00"])

    r = httpx.post(f"{server.base}/v1/sprites/{NAME}/exec", params=_exec_params("cat"),
                   content=b"x" * (10 * 1024 * 1024 + 1), timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_close_sprite_ends_sessions(server: Server) -> None:
    """close_sprite kills every session of the sprite: the client gets exit 137 and the
    sprite has no active session left."""
    from websockets.asyncio.client import connect

    async def go() -> None:
        async with connect(server.ws(f"/v1/sprites/{NAME}/exec",
                                     _exec_params("sleep", "100"))) as ws:
            await ws.recv()
            async with httpx.AsyncClient() as http:
                closing = asyncio.ensure_future(
                    http.post(f"{server.base}/_test/close_sprite/{NAME}", timeout=20))
                frames = await _frames_until_exit(ws)
                assert (await closing).status_code == 200
            assert frames[-1] == bytes((3, 137))

    asyncio.run(go())
    assert httpx.get(f"{server.base}/_test/active/{NAME}").json() == {"active": 0}


def test_max_run_after_disconnect(server: Server) -> None:
    """With max_run_after_disconnect, a command whose clients left is stopped after it."""
    info = asyncio.run(_start_detached(server, "sleep", "100",
                                       max_run_after_disconnect="300ms"))
    deadline = time.monotonic() + 5
    while True:
        ids = [s["id"] for s in
               httpx.get(f"{server.base}/v1/sprites/{NAME}/exec").json()["sessions"]]
        if info["session_id"] not in ids:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ---- in-process: backpressure and detached buffering ------------------------------------

class _Recorder(Attachment):
    """A deliberately slow client that notes how far the pipe reader ran ahead of it."""

    def __init__(self, session_ref: list[Any], delay: float) -> None:
        super().__init__()
        self.ref = session_ref
        self.delay = delay
        self.received = 0
        self.max_ahead = 0
        self.events: list[str] = []

    async def send_info(self, info: dict[str, Any]) -> None:
        self.events.append("info")

    async def send_output(self, stream: int, data: bytes) -> None:
        assert len(data) <= CHUNK
        await asyncio.sleep(self.delay)
        self.received += len(data)
        self.max_ahead = max(self.max_ahead, self.ref[0].bytes_out - self.received)
        if self.events[-1] != "out":
            self.events.append("out")

    async def send_exit(self, code: int) -> None:
        self.events.append(f"exit {code}")


def test_backpressure_reads_no_faster_than_the_client(sprite: BusyboxSprite) -> None:
    """With a slow client attached the server never holds more than one chunk beyond what
    the client took, and the exit comes after all output."""
    async def go() -> _Recorder:
        registry = SessionRegistry()
        session = await registry.start(sprite.handle,
                                       ExecSpec(argv=("head", "-c", "3000000", "/dev/zero")))
        client = _Recorder([session], delay=0.002)
        await session.attach(client, owner=True)
        session.start()
        await asyncio.wait_for(session.finished.wait(), 30)
        return client

    client = asyncio.run(go())
    assert client.received == 3_000_000
    assert client.max_ahead <= CHUNK
    assert client.events == ["info", "out", "exit 0"]


def test_detached_output_never_blocks_the_command(sprite: BusyboxSprite) -> None:
    """With no client, output is read on into the ring (bounded) and the command finishes."""
    async def go() -> tuple[int, bytes, int | None]:
        registry = SessionRegistry(ring_bytes=100_000)
        session = await registry.start(sprite.handle, ExecSpec(
            argv=("sh", "-c", "head -c 5000000 /dev/zero; echo END; echo err >&2")))
        session.start()
        await asyncio.wait_for(session.finished.wait(), 30)
        data = b"".join(d for s, d in session.ring.snapshot() if s == 1)
        assert registry.active(sprite.handle.name) == 0
        return session.ring.size, data, session.exit_code

    size, data, code = asyncio.run(go())
    assert size == 100_000 and data.endswith(b"\0END\n") and code == 0


# ---- the file ring and sessions across a server restart ---------------------------------

def _runs(snapshot: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Consecutive bytes of one stream joined: what both rings must agree on."""
    out: list[tuple[int, bytes]] = []
    for stream, data in snapshot:
        if out and out[-1][0] == stream:
            out[-1] = (stream, out[-1][1] + bytes(data))
        elif data:
            out.append((stream, bytes(data)))
    return out


def test_file_ring_keeps_what_the_memory_ring_keeps(tmp_path: Path) -> None:
    """Random appends (tiny to larger than the ring, both streams): the file ring holds
    the same newest `limit` bytes, streams and order as OutputRing, in chunks of at most
    CHUNK; reopened from its file it gives the same snapshot and appends on."""
    import random

    from wisp.exec.sessions import FileRing, OutputRing

    rng = random.Random(7)
    for trial in range(60):
        limit = rng.choice([1, 10, 4096, 100_000, 1 << 20])
        mem, path = OutputRing(limit), tmp_path / f"{trial}.ring"
        ring = FileRing(path, limit)
        for _ in range(rng.randrange(1, 40)):
            n = rng.choice([1, 5, 999, CHUNK, 70_000, 1_500_000])
            data = rng.randbytes(min(n, 4096)) * (n // 4096 + 1)
            stream = rng.choice([1, 2])
            mem.append(stream, data[:n])
            ring.append(stream, data[:n])
            assert ring.size == mem.size
        snap = ring.snapshot()
        assert _runs(snap) == _runs(mem.snapshot())
        assert all(0 < len(d) <= CHUNK for _, d in snap)
        ring.close()
        again = FileRing(path, limit)
        assert again.snapshot() == snap
        again.append(2, b"more")
        mem.append(2, b"more")
        assert _runs(again.snapshot()) == _runs(mem.snapshot())
        again.close()


def test_file_ring_bad_files_read_as_empty(tmp_path: Path) -> None:
    """A missing, truncated, garbage or other-sized file is an empty ring (no exception);
    a torn newest header slot falls back to the state published before it."""
    from wisp.exec.sessions import FileRing

    path = tmp_path / "r.ring"
    ring = FileRing(path, 4096)
    ring.append(1, b"first")
    ring.append(2, b"second")
    ring.close()
    good = path.read_bytes()
    for bad in [b"", good[:100], good[:5000], b"\xff" * len(good), os.urandom(len(good)),
                good[:64] + b"\0" * 200 + good[264:]]:
        path.write_bytes(bad)
        r = FileRing(path, 4096)
        assert r.snapshot() == [] and r.size == 0, bad[:16]
        r.append(1, b"fresh")
        assert r.snapshot() == [(1, b"fresh")]
        r.close()
    path.write_bytes(good)
    assert FileRing(path, 100).snapshot() == []  # other limit: not this ring
    # The newest state went into slot seq & 1; spoil it mid-write: the previous one shows.
    path.write_bytes(good)
    r = FileRing(path, 4096)
    off = (64, 128)[r._seq & 1]
    r.close()
    torn = bytearray(good)
    torn[off + 16:off + 24] = b"\x13" * 8
    path.write_bytes(bytes(torn))
    assert FileRing(path, 4096).snapshot() == [(1, b"first")]


class _Client(Attachment):
    """Records everything a client gets."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[tuple[int, bytes]] = []
        self.code: int | None = None

    async def send_info(self, info: dict[str, Any]) -> None:
        self.info = info

    async def send_output(self, stream: int, data: bytes) -> None:
        self.out.append((stream, bytes(data)))

    async def send_exit(self, code: int) -> None:
        self.code = code

    def stream(self, sid: int) -> bytes:
        return b"".join(d for s, d in self.out if s == sid)


_TICKER = ("echo start; echo err-start >&2; i=0; while [ $i -lt 15 ]; do echo tick-$i; "
           "i=$((i+1)); sleep 0.1; done; read x; echo got-$x; exit 9")


def _ticks(out: bytes) -> list[str]:
    return [w for w in out.decode().split() if w.startswith("tick-")]


async def _adopt_and_finish(registry: SessionRegistry, handle: Any, sid: str,
                            stdin: bytes = b"bye\n") -> _Client:
    assert await registry.adopt(handle) == 1
    session = registry.get(handle.name, sid)
    client = _Client()
    await session.attach(client)
    await session.write_stdin(stdin)
    await asyncio.wait_for(client.done.wait(), 20)
    return client


def test_detach_all_then_a_new_registry_adopts(sprite: BusyboxSprite, tmp_path: Path) -> None:
    """detach_all drops the client (no exit) and leaves the process running; a new
    registry on the same state_dir adopts it: replay of the old output, then the output
    made meanwhile (nothing lost), stdin, and the exit."""
    async def go() -> tuple[_Client, _Client, list[Path]]:
        old = SessionRegistry(state_dir=tmp_path)
        session = await old.start(sprite.handle, ExecSpec(argv=("sh", "-c", _TICKER)))
        first = _Client()
        await session.attach(first, owner=True)
        session.start()
        while b"tick-2" not in first.stream(1):
            await asyncio.sleep(0.02)
        await old.detach_all()
        assert first.dropped and first.code is None and old.active(sprite.handle.name) == 0
        files = sorted((tmp_path / sprite.handle.name).iterdir())
        await asyncio.sleep(0.5)  # output made while no server holds it
        new = SessionRegistry(state_dir=tmp_path)
        client = await _adopt_and_finish(new, sprite.handle, session.id)
        return first, client, files

    first, client, files = asyncio.run(go())
    assert [f.suffix for f in files] == [".json", ".ring"]
    out = client.stream(1)
    assert out.startswith(b"start\ntick-0\n") and client.stream(2) == b"err-start\n"
    assert _ticks(out.decode().split("got-")[0].encode()) == [f"tick-{i}" for i in range(15)]
    assert out.endswith(b"got-bye\n") and client.code == 9


def test_sigkilled_server_s_sessions_are_adopted(sprite: BusyboxSprite, tmp_path: Path) -> None:
    """A process that holds a registry is SIGKILLed mid-stream: a new registry adopts the
    session from the files and the agent, with every line the command printed."""
    script = f"""
import asyncio, sys
from pathlib import Path
from wisp.exec.sessions import ExecSpec, SessionRegistry
from wisp.runtime.base import SpriteHandle
async def main():
    h = SpriteHandle(name={sprite.handle.name!r}, rootfs=Path({str(sprite.handle.rootfs)!r}),
                     agent_socket=Path({str(sprite.handle.agent_socket)!r}))
    reg = SessionRegistry(state_dir=Path({str(tmp_path)!r}))
    s = await reg.start(h, ExecSpec(argv=("sh", "-c", {_TICKER!r})))
    s.start()
    while s.bytes_out < 20:
        await asyncio.sleep(0.01)
    print(s.id, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None
        sid = proc.stdout.readline().decode().strip()
        time.sleep(0.3)  # pumping on: the kill lands while the ring is being written
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sid
    client = asyncio.run(_adopt_and_finish(SessionRegistry(state_dir=tmp_path),
                                           sprite.handle, sid))
    out = client.stream(1)
    assert out.startswith(b"start\n") and out.endswith(b"got-bye\n") and client.code == 9
    assert _ticks(out) == [f"tick-{i}" for i in range(15)]


def test_adopt_of_gone_and_exited_sessions(sprite: BusyboxSprite, tmp_path: Path) -> None:
    """After a restart: a session that had exited keeps its recorded exit; one that exited
    while no server held it gets the agent's exit code and its output; one the agent does
    not know (its record was dropped) is exited 137 with the output its ring kept; junk
    metadata is removed, never a crash."""
    async def go() -> tuple[int, list[_Client], set[str]]:
        old = SessionRegistry(state_dir=tmp_path)
        a = await old.start(sprite.handle, ExecSpec(argv=("sh", "-c", "echo A; exit 5")))
        b = await old.start(sprite.handle, ExecSpec(argv=("sh", "-c", "echo B; sleep 30")))
        c = await old.start(sprite.handle, ExecSpec(argv=("sh", "-c",
                                                          "sleep 0.2; echo C; exit 6")))
        for s in (a, b, c):
            s.start()
        await asyncio.wait_for(a.finished.wait(), 10)
        while b.bytes_out < 2:
            await asyncio.sleep(0.02)
        await old.detach_all()
        # b's process is killed behind everyone's back, and adopted (so forgotten) by a
        # stranger: the agent no longer knows it.
        await _kill_and_forget(sprite, b.pid)
        d = tmp_path / sprite.handle.name
        (d / "999.json").write_text("{not json")
        (d / "998.json").write_text(json.dumps({"id": "998", "pid": -1}))
        await asyncio.sleep(0.3)
        new = SessionRegistry(state_dir=tmp_path)
        running = await new.adopt(sprite.handle)
        clients = []
        for s in (a, b, c):
            cl = _Client()
            await new.get(sprite.handle.name, s.id).attach(cl)
            await asyncio.wait_for(cl.done.wait(), 10)
            clients.append(cl)
        return running, clients, {f.name for f in d.iterdir()}

    running, (ca, cb, cc), names = asyncio.run(go())
    assert running == 1  # c, through the agent (its exit follows at once)
    assert (ca.stream(1), ca.code) == (b"A\n", 5)
    assert (cb.stream(1), cb.code) == (b"B\n", 137)
    assert (cc.stream(1), cc.code) == (b"C\n", 6)
    assert not {"999.json", "998.json"} & names


async def _kill_and_forget(sprite: BusyboxSprite, pid: int) -> None:
    from wisp.runtime import agent

    proc = await agent.adopt(sprite.handle.agent_socket, pid)
    assert proc is not None
    await proc.signal(9)
    await asyncio.wait_for(proc.wait(), 5)
    proc.close()


def test_adopt_is_quick_and_files_go_with_the_sprite(sprite: BusyboxSprite,
                                                     tmp_path: Path) -> None:
    """20 sprites x 3 sessions (names sharing one container) adopt well under 2 s;
    close_sprite kills and removes a sprite's files; expiry removes an exited one's."""
    from dataclasses import replace

    async def go() -> tuple[float, int, bool, bool]:
        handles = [replace(sprite.handle, name=f"s{i}") for i in range(20)]
        old = SessionRegistry(state_dir=tmp_path)
        for h in handles:
            for _ in range(3):
                (await old.start(h, ExecSpec(argv=("sleep", "30")))).start()
        await old.detach_all()
        new = SessionRegistry(state_dir=tmp_path, keep_exited=0.5)
        t0 = time.monotonic()
        counts = await asyncio.gather(*(new.adopt(h) for h in handles))
        elapsed = time.monotonic() - t0
        await new.close_sprite("s0")
        s0_gone = not (tmp_path / "s0").exists()
        session = await new.start(handles[1], ExecSpec(argv=("true",)))
        session.start()
        await asyncio.wait_for(session.finished.wait(), 10)
        assert (tmp_path / "s1" / f"{session.id}.ring").exists()
        await asyncio.sleep(0.6)
        new._expire("s1")
        expired = not (tmp_path / "s1" / f"{session.id}.ring").exists()
        await new.close_all()
        return elapsed, sum(counts), s0_gone, expired

    elapsed, count, s0_gone, expired = asyncio.run(go())
    assert count == 60 and elapsed < 2.0, (count, elapsed)
    assert s0_gone and expired
    assert not any(tmp_path.iterdir())
