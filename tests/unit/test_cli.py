"""Unit tests of the `wisp` CLI and `wisp.client`.

The server side here is `StubApi`, a tiny Starlette app served by a real uvicorn on a
loopback port. It is a *protocol stand-in for CLI parsing only*: it speaks just enough of
the Sprites v1 contract (docs/sprites-api.md §2.1-§2.6, §2.10, §3.1) plus Wisp's fork and
checkpoint-delete extensions for the CLI's requests, replies, framing and exit codes to be
checked. It runs nothing; the real server is tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import uvicorn
from click.testing import CliRunner, Result
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import wisp.cli
import wisp.client
from wisp.cli.exec import CONSOLE_CMD
from wisp.cli.main import cli
from wisp.client import (
    ApiError,
    Client,
    ClientConfig,
    ConfigError,
    ConnectError,
    Context,
    announce_server,
    client_config_path,
    discover_endpoint,
    load_client_config,
    register_server,
    resolve_endpoint,
    save_client_config,
)

TOKEN = "org/1/abc/def"
REPO = Path(__file__).resolve().parents[2]
NOW = "2026-01-13T10:30:00Z"


# --------------------------------------------------------------------------- stub server


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


@dataclass
class StubState:
    sprites: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    in_use: dict[str, str] = field(default_factory=dict)
    page_size: int = 500
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    exec_queries: list[dict[str, Any]] = field(default_factory=list)
    waiting_for_signal: threading.Event = field(default_factory=threading.Event)

    def add(self, name: str, labels: list[str] | None = None) -> dict[str, Any]:
        sprite = {"id": f"sprite-{uuid.uuid4()}", "name": name, "organization": "wisp",
                  "status": "cold", "url": f"http://{name}.localhost", "labels": labels or [],
                  "created_at": NOW, "updated_at": NOW, "last_running_at": None}
        self.sprites[name] = sprite
        self.checkpoints[name] = []
        return sprite


def make_stub_app(state: StubState) -> Starlette:
    """See the module docstring: a protocol stand-in, not a server."""

    def denied(request: Request) -> Response | None:
        state.requests.append((request.method, request.url.path, request.url.query))
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return _error(401, "unauthorized", "invalid or missing token")
        return None

    def missing(name: str) -> JSONResponse:
        return _error(404, "sprite_not_found", f"sprite '{name}' not found")

    async def list_sprites(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        q = request.query_params
        limit = min(int(q.get("max_results", "50")), state.page_size)
        after = q.get("continuation_token", "")
        names = sorted(n for n in state.sprites
                       if n.startswith(q.get("prefix", "")) and n > after)
        page = names[:limit]
        out: dict[str, Any] = {"sprites": [state.sprites[n] for n in page],
                               "has_more": len(names) > limit}
        if out["has_more"]:
            out["next_continuation_token"] = page[-1]
        return JSONResponse(out)

    async def create_sprite(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        body = await request.json()
        state.bodies.append(body)
        if body["name"] in state.sprites:
            return _error(400, "sprite_exists", f"sprite '{body['name']}' already exists")
        return JSONResponse(state.add(body["name"], body.get("labels")), status_code=201)

    async def sprite(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        name = request.path_params["name"]
        if name not in state.sprites:
            return missing(name)
        if request.method == "DELETE":
            del state.sprites[name]
            return Response(status_code=204)
        return JSONResponse(state.sprites[name])

    async def fork(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        body = await request.json()
        state.bodies.append(body)
        if request.path_params["name"] not in state.sprites:
            return missing(request.path_params["name"])
        return JSONResponse(state.add(body["name"], body["labels"]), status_code=201)

    async def restart(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        name = request.path_params["name"]
        if name not in state.sprites:
            return missing(name)
        return JSONResponse({"sprite_name": name, "machine_id": state.sprites[name]["id"],
                             "message": "sprite restarted"})

    async def checkpoint_create(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        name = request.path_params["name"]
        if name not in state.sprites:
            return missing(name)
        body = await request.json()
        cps = state.checkpoints[name]
        cp_id = f"v{len(cps)}"

        async def events() -> Any:
            yield json.dumps({"type": "info", "data": "Creating checkpoint...",
                              "time": NOW}) + "\n"
            await asyncio.sleep(0.01)
            if body.get("comment") == "fail":
                await asyncio.sleep(0.3)  # long enough for a terminal spinner to be drawn
                yield json.dumps({"type": "error", "error": "Checkpoint failed: disk full",
                                  "time": NOW}) + "\n"
                return
            cps.insert(0, {"id": cp_id, "create_time": NOW, "comment": body.get("comment", ""),
                           "history": [c["id"] for c in cps], "is_auto": False,
                           "source_id": cps[0]["id"] if cps else None, "health": ""})
            yield json.dumps({"type": "complete", "data": f"Checkpoint {cp_id} created",
                              "id": cp_id, "time": NOW}) + "\n"

        return StreamingResponse(events(), media_type="application/x-ndjson")

    async def checkpoint_list(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        name = request.path_params["name"]
        if name not in state.sprites:
            return missing(name)
        return JSONResponse(state.checkpoints[name])

    async def checkpoint_one(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        name, cp_id = request.path_params["name"], request.path_params["cp"]
        if name not in state.sprites:
            return missing(name)
        cps = state.checkpoints[name]
        found = [c for c in cps if c["id"] == cp_id]
        if not found:
            return _error(404, "checkpoint_not_found", f"checkpoint {cp_id} not found")
        if request.method == "GET":
            return JSONResponse(found[0])
        if state.in_use.get(name) == cp_id:
            return _error(409, "conflict", f"checkpoint {cp_id} is in use")
        cps.remove(found[0])
        return Response(status_code=204)

    async def restore(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        name, cp_id = request.path_params["name"], request.path_params["cp"]
        if not any(c["id"] == cp_id for c in state.checkpoints.get(name, [])):
            return _error(404, "checkpoint_not_found", f"checkpoint {cp_id} not found")
        state.in_use[name] = cp_id
        lines = [{"type": "info", "data": "Stopping sprite..."},
                 {"type": "info", "data": "Restoring filesystem..."},
                 {"type": "complete", "data": f"Restored to {cp_id}"}]
        return Response("".join(json.dumps(x) + "\n" for x in lines),
                        media_type="application/x-ndjson")

    async def exec_ws(ws: WebSocket) -> None:
        name = ws.path_params["name"]
        if ws.headers.get("authorization") != f"Bearer {TOKEN}":
            await ws.send_denial_response(_error(401, "unauthorized", "bad token"))
            return
        if name not in state.sprites:
            await ws.send_denial_response(missing(name))
            return
        q = ws.query_params
        cmd, tty = q.getlist("cmd"), q.get("tty") == "true"
        state.exec_queries.append({"cmd": cmd, "path": q.get("path"), "env": q.getlist("env"),
                                   "dir": q.get("dir"), "tty": tty, "stdin": q.get("stdin"),
                                   "rows": q.get("rows"), "cols": q.get("cols")})
        await ws.accept(headers=[(b"x-sprite-capabilities", b"signal")])
        await ws.send_text(json.dumps({"type": "session_info", "session_id": "7",
                                       "command": " ".join(cmd), "created": 0, "tty": tty}))
        if tty:
            await _tty_program(ws, cmd)
        else:
            await _pipe_program(ws, cmd, state)

    return Starlette(routes=[
        Route("/v1/sprites", list_sprites, methods=["GET"]),
        Route("/v1/sprites", create_sprite, methods=["POST"]),
        Route("/v1/sprites/{name}", sprite, methods=["GET", "DELETE"]),
        Route("/v1/sprites/{name}/fork", fork, methods=["POST"]),
        Route("/v1/sprites/{name}/restart", restart, methods=["POST"]),
        Route("/v1/sprites/{name}/checkpoint", checkpoint_create, methods=["POST"]),
        Route("/v1/sprites/{name}/checkpoints", checkpoint_list, methods=["GET"]),
        Route("/v1/sprites/{name}/checkpoints/{cp}", checkpoint_one, methods=["GET", "DELETE"]),
        Route("/v1/sprites/{name}/checkpoints/{cp}/restore", restore, methods=["POST"]),
        WebSocketRoute("/v1/sprites/{name}/exec", exec_ws),
    ])


async def _next(ws: WebSocket) -> Any:
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise ConnectionError("client went away")
    return message


async def _pipe_program(ws: WebSocket, cmd: list[str], state: StubState) -> None:
    """Non-TTY pretend programs, framed as contract §3.1 (stream byte + payload)."""
    prog, args = cmd[0], cmd[1:]
    code = 0
    if prog == "echo":
        await ws.send_bytes(b"\x01" + (" ".join(args) + "\n").encode())
    elif prog == "cat":  # stdin back to stdout until 0x04
        while True:
            data = (await _next(ws)).get("bytes") or b""
            if data[:1] == b"\x00":
                await ws.send_bytes(b"\x01" + data[1:])
            elif data == b"\x04":
                break
    elif prog == "fail":
        await ws.send_bytes(b"\x01out\n")
        await ws.send_bytes(b"\x02boom\n")
        code = int(args[0])
    elif prog == "wait-signal":  # after stdin EOF, wait for a forwarded signal
        while (await _next(ws)).get("bytes") != b"\x04":
            pass
        state.waiting_for_signal.set()
        try:
            msg = await asyncio.wait_for(_next(ws), timeout=10)
            sig = json.loads(msg["text"])["signal"]
            await ws.send_bytes(b"\x01got " + sig.encode() + b"\n")
            code = 130
        except TimeoutError:
            code = 99
    elif prog == "lose":  # the connection drops before any exit status
        await ws.close(code=1011)
        return
    elif prog == "partial-lose":  # half a line of output, then the connection drops
        await ws.send_bytes(b"\x01no newline")
        await ws.close(code=1011)
        return
    else:  # report what arrived
        await ws.send_bytes(b"\x01" + json.dumps(state.exec_queries[-1]).encode() + b"\n")
    await ws.send_bytes(bytes([3, code]))
    try:
        await asyncio.wait_for(_next(ws), timeout=2)  # the client's close
    except (TimeoutError, ConnectionError):
        pass


async def _tty_program(ws: WebSocket, cmd: list[str]) -> None:
    """TTY pretend programs: raw frames, exit as JSON and/or close code (contract §3.1)."""
    prog = cmd[0]
    if prog == "tty-echo":  # echo keystrokes until "exit" is typed, then exit 3
        await ws.send_bytes(b"tty ready\r\n")
        typed = b""
        while b"exit" not in typed:
            data = (await _next(ws)).get("bytes") or b""
            typed += data
            await ws.send_bytes(data)
        await ws.send_text(json.dumps({"type": "exit", "exit_code": 3}))
        await ws.close(code=4003)
    elif prog == "tty-lose":  # a prompt (no newline), then the connection drops
        await ws.send_bytes(b"sprite:~$ ")
        await ws.close(code=1011)
    elif prog == "tty-close":  # only the close code carries the status
        await ws.send_bytes(b"bye\r\n")
        await ws.close(code=4005)
    else:
        await ws.send_bytes(b"cmd=" + json.dumps(cmd).encode() + b"\r\n")
        await ws.send_text(json.dumps({"type": "exit", "exit_code": 0}))
        await ws.close(code=1000)


@dataclass
class Stub:
    url: str
    state: StubState


@pytest.fixture(scope="module")
def stub_server() -> Iterator[Stub]:
    state = StubState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_stub_app(state), log_level="warning",
                                           lifespan="off", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.01)
    host, port = sock.getsockname()
    try:
        yield Stub(f"http://{host}:{port}", state)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def stub(stub_server: Stub) -> Stub:
    """The shared server with empty state for each test."""
    st = stub_server.state
    st.sprites.clear()
    st.checkpoints.clear()
    st.in_use.clear()
    st.requests.clear()
    st.bodies.clear()
    st.exec_queries.clear()
    st.waiting_for_signal.clear()
    st.page_size = 500
    return stub_server


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated HOME / XDG_CONFIG_HOME / cwd, so no real client.json or .wisp-sprite
    is read and nothing is written outside tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("WISP_API", "WISP_TOKEN", "WISP_SPRITE", "WISP_CONTEXT",
                "WISP_SERVE_CONTEXT", "WISP_NO_CLIENT_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


@pytest.fixture
def run(stub: Stub, home: Path) -> Any:
    """Run the CLI in-process against the stub, configured through WISP_API/WISP_TOKEN."""

    def invoke(*args: str, input: str | bytes | None = None,
            env: dict[str, str | None] | None = None) -> Result:
        base: dict[str, str | None] = {"WISP_API": stub.url, "WISP_TOKEN": TOKEN}
        return CliRunner().invoke(cli, list(args), input=input, env={**base, **(env or {})},
                                  catch_exceptions=False)

    return invoke


# --------------------------------------------------------------------------- surface


def test_exported_members() -> None:
    """The public surfaces other modules rely on are exactly these names."""
    assert wisp.cli.__all__ == ["cli", "main"]
    assert set(wisp.client.__all__) == {
        "Client", "ClientError", "ConfigError", "ConnectError", "ApiError", "ProxyError",
        "ProtocolError", "Sprite", "Checkpoint", "ProgressEvent", "Service", "RestartResult",
        "UrlLink",
        "Context", "ClientConfig",
        "Endpoint", "LOCAL_CONTEXT", "check_context_name", "check_api_url",
        "client_config_path", "load_client_config", "save_client_config",
        "edit_client_config", "register_server", "resolve_endpoint", "discover_endpoint",
        "announce_server", "USER_AGENT"}
    for name in wisp.client.__all__:
        assert hasattr(wisp.client, name)


def test_help_imports_no_heavy_libraries() -> None:
    """`import wisp.cli.main` (all `wisp --help` needs) loads neither httpx, rich nor
    websockets, and `wisp --help` lists every verb."""
    code = ("import sys, wisp.cli.main; "
            "print([m for m in ('httpx', 'rich', 'websockets', 'asyncio') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in ("create", "list", "show", "use", "exec", "console", "proxy", "restart",
                 "checkpoint", "restore", "fork", "destroy", "context", "serve", "image"):
        assert f"  {verb} " in result.output


def test_usage_errors_exit_2(run: Any) -> None:
    """Bad command lines exit 2: unknown verb, missing argument, malformed --env."""
    assert run("frobnicate").exit_code == 2
    assert run("create").exit_code == 2
    result = run("exec", "-s", "a", "--env", "NOEQUALS", "--", "true")
    assert result.exit_code == 2
    assert "K=V" in result.output or "KEY=VALUE" in result.output
    assert run("exec", "-s", "a").exit_code == 2  # no command


# --------------------------------------------------------------------------- discovery


def _save(current: str | None, **contexts: tuple[str, str | None]) -> Path:
    return save_client_config(ClientConfig(
        {name: Context(api, token) for name, (api, token) in contexts.items()}, current))


def test_discover_endpoint_precedence(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit arguments beat WISP_API/WISP_TOKEN, which beat the context (--context,
    then WISP_CONTEXT, then the current one); a context's token is never paired with a
    different API URL."""
    path = _save("a", a=("http://127.0.0.1:7770", "a-token"), b=("http://127.0.0.2:7770/", "b"))
    assert path == home / "config" / "wisp" / "client.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert discover_endpoint() == ("http://127.0.0.1:7770", "a-token")
    assert discover_endpoint(context="b") == ("http://127.0.0.2:7770", "b")
    monkeypatch.setenv("WISP_CONTEXT", "b")
    assert discover_endpoint() == ("http://127.0.0.2:7770", "b")
    assert discover_endpoint(context="a") == ("http://127.0.0.1:7770", "a-token")
    monkeypatch.setenv("WISP_TOKEN", "env-token")
    assert discover_endpoint() == ("http://127.0.0.2:7770", "env-token")
    monkeypatch.setenv("WISP_API", "http://10.0.0.1:1/")
    monkeypatch.delenv("WISP_TOKEN")
    assert discover_endpoint() == ("http://10.0.0.1:1", None)  # b's token not leaked
    found = resolve_endpoint()
    assert (found.context, found.source) == (None, "WISP_API")
    assert discover_endpoint("http://127.0.0.2:7770", None) == (
        "http://127.0.0.2:7770", "b")  # the URL of the selected context: its token
    assert discover_endpoint("https://x", "opt") == ("https://x", "opt")
    monkeypatch.delenv("WISP_API")
    found = resolve_endpoint(context="a")
    assert (found.api, found.context) == ("http://127.0.0.1:7770", "a")
    assert found.source.startswith("context a (--context")


def test_discover_endpoint_errors(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration, a malformed client.json, an unknown context, contexts but no
    current one and a non-HTTP URL are clear ConfigErrors; a relative XDG_CONFIG_HOME is
    ignored as the XDG spec says."""
    with pytest.raises(ConfigError, match="--api.*wisp context add"):
        discover_endpoint()
    path = client_config_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        discover_endpoint()
    path.write_text('{"contexts": {"a": {"token": "t"}}}')
    with pytest.raises(ConfigError, match="'a' must be an object with a string"):
        discover_endpoint()
    _save(None, a=("http://127.0.0.1:1", "t"))
    with pytest.raises(ConfigError, match="no current context.*wisp context use NAME"):
        discover_endpoint()
    with pytest.raises(ConfigError, match="no context 'typo'.*known: a"):
        discover_endpoint("http://127.0.0.1:1", context="typo")
    with pytest.raises(ConfigError, match="http"):
        discover_endpoint("127.0.0.1:7770", "t")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")
    assert client_config_path() == home / ".config" / "wisp" / "client.json"


def test_old_single_server_file_is_migrated(home: Path) -> None:
    """A client.json in the single-server form of earlier versions is read as the current
    context "local"; the next change saves the new form with that context kept."""
    path = client_config_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"api": "http://127.0.0.1:7770", "token": "old"}')
    assert discover_endpoint() == ("http://127.0.0.1:7770", "old")
    result = CliRunner().invoke(cli, ["context", "add", "other", "http://10.0.0.1:7770"])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc == {"current": "local", "contexts": {
        "local": {"api": "http://127.0.0.1:7770", "token": "old"},
        "other": {"api": "http://10.0.0.1:7770", "token": None}}}
    assert path.stat().st_mode & 0o777 == 0o600


def test_register_server_keeps_contexts_and_current(home: Path) -> None:
    """`wisp serve` registration: the default data dir is "local", another data dir its
    folder name; a second server is added beside the first without taking "current";
    the same data dir keeps its name across restarts; a name owned by another data dir or
    added by hand gets a suffix; an explicit name wins; with no current context (or its
    own name current) the server becomes current."""
    assert register_server("http://127.0.0.1:7770", "t1", Path("/var/lib/wisp")) == (
        "local", True)
    assert register_server("http://127.0.0.1:7771", "t2", Path("/srv/Wisp Two")) == (
        "wisp-two", False)
    assert register_server("http://127.0.0.1:7772", "t2b", Path("/srv/Wisp Two")) == (
        "wisp-two", False)  # restarted on another port: same entry, new URL
    assert register_server("http://127.0.0.1:7773", "t3", Path("/other/wisp-two")) == (
        "wisp-two-2", False)
    _add = CliRunner().invoke(cli, ["context", "add", "mine", "https://remote:7770"])
    assert _add.exit_code == 0, _add.output
    assert register_server("http://127.0.0.1:7774", "t4", Path("/x/mine")) == (
        "mine-2", False)
    assert register_server("http://127.0.0.1:7775", "t5", Path("/y"), name="staging") == (
        "staging", False)
    assert register_server("http://127.0.0.1:7776", "t1", Path("/var/lib/wisp")) == (
        "local", True)
    config = load_client_config()
    assert config.current == "local"
    assert {n: (c.api, c.token, c.data_dir) for n, c in config.contexts.items()} == {
        "local": ("http://127.0.0.1:7776", "t1", "/var/lib/wisp"),
        "wisp-two": ("http://127.0.0.1:7772", "t2b", "/srv/Wisp Two"),
        "wisp-two-2": ("http://127.0.0.1:7773", "t3", "/other/wisp-two"),
        "mine": ("https://remote:7770", None, None),
        "mine-2": ("http://127.0.0.1:7774", "t4", "/x/mine"),
        "staging": ("http://127.0.0.1:7775", "t5", "/y")}
    assert CliRunner().invoke(cli, ["context", "remove", "local"]).exit_code == 0
    assert register_server("http://127.0.0.1:7777", "t6", Path("/z")) == ("z", True)


def test_old_file_from_another_server_is_taken_over_by_local(home: Path) -> None:
    """The migrated single-server entry ("local", no data dir) is replaced by the server
    on the default data dir even when it pointed elsewhere (an old test server's port)."""
    path = client_config_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"api": "http://127.0.0.1:45678", "token": "stale"}')
    assert register_server("http://127.0.0.1:7770", "t", Path("/var/lib/wisp")) == (
        "local", True)
    assert discover_endpoint() == ("http://127.0.0.1:7770", "t")


def test_cli_reads_client_json(stub: Stub, home: Path) -> None:
    """With no flags and no env, the CLI finds the server and token in the current
    context of client.json."""
    stub.state.add("alpha")
    _save("s", s=(stub.url, TOKEN))
    result = CliRunner().invoke(cli, ["list", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [s["name"] for s in json.loads(result.stdout)] == ["alpha"]


def test_context_commands(stub: Stub, home: Path) -> None:
    """`wisp context add|list|use|show|remove` keep named servers; `--context NAME` and
    WISP_CONTEXT pick one for one command; WISP_API still comes first; an unknown
    name exits 1 with a message."""
    stub.state.add("alpha")

    def wisp(*args: str, input: str | None = None,
             env: dict[str, str | None] | None = None) -> Result:
        return CliRunner().invoke(cli, list(args), input=input, env=env,
                                  catch_exceptions=False)

    r = wisp("context", "add", "stub", stub.url, "--token", "-", input=TOKEN + "\n")
    assert (r.exit_code, r.stdout) == (0, f"added context stub ({stub.url}), now current\n")
    assert wisp("context", "add", "dead", "http://127.0.0.1:1").exit_code == 0
    assert wisp("context", "add", "bad name", stub.url).exit_code == 2
    assert wisp("context", "add", "x", "ftp://h").exit_code == 2
    assert wisp("list", "--json").exit_code == 0  # stub is current
    listed = json.loads(wisp("context", "list", "--json").stdout)
    assert listed == {"current": "stub", "contexts": {
        "dead": {"api": "http://127.0.0.1:1", "data_dir": None},
        "stub": {"api": stub.url, "data_dir": None}}}
    table = wisp("context", "list").stdout.splitlines()
    assert table[0].split() == ["CURRENT", "NAME", "API", "DATA", "DIR"]
    assert table[2].split()[:3] == ["*", "stub", stub.url]
    assert wisp("--context", "dead", "list").stderr.startswith("error: cannot reach")
    assert wisp("list", env={"WISP_CONTEXT": "dead"}).exit_code == 1
    assert wisp("list", env={"WISP_CONTEXT": "dead", "WISP_API": stub.url,
                             "WISP_TOKEN": TOKEN}).exit_code == 0
    r = wisp("--context", "nope", "list")
    assert r.exit_code == 1 and r.stderr.startswith("error: no context 'nope'")
    shown = wisp("context", "show").stdout
    assert f"api      {stub.url}" in shown and TOKEN not in shown
    assert "context  stub" in shown and "current context" in shown
    shown = json.loads(wisp("context", "show", "--json", "--show-token").stdout)
    assert (shown["context"], shown["api"], shown["token"]) == ("stub", stub.url, TOKEN)
    r = wisp("context", "use", "dead")
    assert (r.exit_code, r.stdout) == (0, "using context dead (http://127.0.0.1:1)\n")
    assert wisp("context", "show", "stub", "--json").exit_code == 0
    assert wisp("list").exit_code == 1
    assert wisp("context", "use", "nope").exit_code == 1
    r = wisp("context", "remove", "dead")
    assert r.exit_code == 0 and "no current context" in r.stdout
    assert wisp("context", "remove", "dead").exit_code == 1
    assert load_client_config().current is None
    r = wisp("list")
    assert r.exit_code == 1 and "wisp context use NAME" in r.stderr


def test_serve_banner_registers_and_try_line_runs(stub: Stub, home: Path,
                                                  tmp_path: Path) -> None:
    """The block `wisp serve` prints: it registers the server (not current when another
    context is), and its "Try:" line is a shell command that works as printed: plain
    `wisp` when the PATH finds this installation's script, else the script's path, with
    --context when the server is not current; WISP_NO_CLIENT_CONFIG=1 writes nothing and
    passes --api/--token instead."""
    stub.state.add("hello")  # `create hello` fails (exists) and stops the `&&` chain
    script = REPO / ".venv" / "bin" / "wisp"
    if Path(sys.executable).parent / "wisp" != script:
        pytest.skip("needs the tests to run in the repository's .venv")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "wisp").symlink_to(script)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / "config")}

    def try_line(text: str) -> str:
        line = next(x for x in text.splitlines() if x.startswith("Try:"))
        return line.removeprefix("Try:").strip()

    def first_command(text: str) -> subprocess.CompletedProcess[str]:
        command = try_line(text).split(" && ")[0].replace("create hello", "list")
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True,
                              text=True, timeout=60)

    banner = announce_server(stub.url, TOKEN, home / "one", env=env)
    assert "Context:   one (current)" in banner
    assert try_line(banner) == "wisp create hello && wisp exec -s hello -- uname -a"
    assert first_command(banner).returncode == 0
    banner = announce_server("http://127.0.0.1:1", "t", home / "two", env=env)
    assert try_line(banner).startswith("wisp --context two create hello && wisp --context two")
    assert first_command(banner).stderr.startswith("error: cannot reach")
    without = {**env, "PATH": "/usr/bin:/bin"}
    banner = announce_server(stub.url, TOKEN, home / "one", env=without)
    assert try_line(banner).startswith(f"{script} create hello")
    before = client_config_path(env).read_bytes()
    banner = announce_server(stub.url, TOKEN, home / "three",
                             env={**env, "WISP_NO_CLIENT_CONFIG": "1"})
    assert client_config_path(env).read_bytes() == before
    assert try_line(banner).startswith(f"wisp --api {stub.url} --token {TOKEN} create hello")
    assert first_command(banner).returncode == 0
    banner = announce_server(stub.url, TOKEN, home / "four",
                             env={**env, "WISP_SERVE_CONTEXT": "named"})
    assert "Context:   named in" in banner
    assert load_client_config(client_config_path(env)).contexts["named"].data_dir == str(
        home / "four")


def test_cli_without_server_config_fails_clearly(home: Path) -> None:
    """No --api, no env, no client.json: exit 1 with a message naming the ways to fix it."""
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no wisp server configured")
    assert "WISP_API" in result.stderr


def test_bad_token_and_unreachable_server(run: Any, stub: Stub) -> None:
    """A 401 prints the server's message; an unreachable server is a one-line error."""
    result = run("list", env={"WISP_TOKEN": "wrong"})
    assert result.exit_code == 1
    assert result.stderr == "error: invalid or missing token\n"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    result = run("--api", f"http://127.0.0.1:{free}", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach wisp server at http://127.0.0.1:{free}")


# --------------------------------------------------------------------------- sprites


def test_create_show_list_destroy(run: Any, stub: Stub) -> None:
    """The sprite verbs send the contract's requests and print the server's objects:
    create (labels), show --json (object), list --json (array), destroy --yes."""
    result = run("create", "web", "--label", "prod", "-l", "eu")
    assert result.exit_code == 0, result.output
    assert result.stdout == "created sprite web\n"
    assert stub.state.bodies[-1] == {"name": "web", "labels": ["prod", "eu"]}
    shown = json.loads(run("show", "web", "--json").stdout)
    assert shown == stub.state.sprites["web"]
    listed = json.loads(run("list", "--json").stdout)
    assert isinstance(listed, list) and listed[0]["name"] == "web"
    table = run("list").stdout
    assert table.split()[:4] == ["NAME", "STATUS", "LABELS", "CREATED"]
    assert "prod,eu" in table
    result = run("destroy", "web", "--yes")
    assert result.exit_code == 0 and "web" not in stub.state.sprites


def test_list_follows_pages_and_prefix(run: Any, stub: Stub) -> None:
    """`wisp list` follows next_continuation_token to the end and passes --prefix."""
    for i in range(5):
        stub.state.add(f"s{i}")
    stub.state.add("other")
    stub.state.page_size = 2
    names = [s["name"] for s in json.loads(run("list", "--json").stdout)]
    assert names == ["other", "s0", "s1", "s2", "s3", "s4"]
    assert sum(1 for m, p, _ in stub.state.requests if m == "GET" and p == "/v1/sprites") == 3
    names = [s["name"] for s in json.loads(run("list", "--prefix", "s", "--json").stdout)]
    assert names == ["s0", "s1", "s2", "s3", "s4"]


def test_api_errors_exit_1_with_message(run: Any, stub: Stub) -> None:
    """REST errors print `error: <message>` to stderr and exit 1 (404, duplicate 400)."""
    result = run("show", "ghost")
    assert (result.exit_code, result.stderr) == (1, "error: sprite 'ghost' not found\n")
    assert result.stdout == ""
    stub.state.add("dup")
    result = run("create", "dup")
    assert (result.exit_code, result.stderr) == (1, "error: sprite 'dup' already exists\n")
    result = run("destroy", "ghost", "--yes")
    assert result.exit_code == 1


def test_destroy_asks_first(run: Any, stub: Stub) -> None:
    """Without --yes, destroy asks; answering no keeps the sprite and exits 1."""
    stub.state.add("keep")
    result = run("destroy", "keep", input="n\n")
    assert result.exit_code == 1
    assert "keep" in stub.state.sprites
    result = run("destroy", "keep", input="y\n")
    assert result.exit_code == 0
    assert "keep" not in stub.state.sprites


def test_fork(run: Any, stub: Stub) -> None:
    """fork posts the extension body {name, checkpoint, labels} and prints the new sprite."""
    stub.state.add("src")
    result = run("fork", "src", "copy", "--checkpoint", "v3", "-l", "x", "--json")
    assert result.exit_code == 0, result.output
    assert stub.state.bodies[-1] == {"name": "copy", "checkpoint": "v3", "labels": ["x"]}
    assert json.loads(result.stdout)["name"] == "copy"
    result = run("fork", "src", "copy2")
    assert stub.state.bodies[-1] == {"name": "copy2", "checkpoint": None, "labels": []}
    assert result.stdout == "forked src into sprite copy2\n"


# --------------------------------------------------------------------------- .wisp-sprite


def test_use_writes_sprite_file_and_commands_find_it(run: Any, stub: Stub,
                                                      home: Path) -> None:
    """`wisp use` checks the sprite, writes ./.wisp-sprite; commands in subdirectories use
    it; -s and WISP_SPRITE override it; `use` alone shows it; --unset removes it."""
    stub.state.add("dev")
    stub.state.add("other")
    result = run("use", "dev")
    assert result.exit_code == 0, result.output
    assert (home / "work" / ".wisp-sprite").read_text() == "dev\n"
    deep = home / "work" / "a" / "b"
    deep.mkdir(parents=True)
    os.chdir(deep)
    assert json.loads(run("show", "--json").stdout)["name"] == "dev"
    run("checkpoint", "list", "--json")
    assert stub.state.requests[-1][1] == "/v1/sprites/dev/checkpoints"
    run("checkpoint", "list", "-s", "other")
    assert stub.state.requests[-1][1] == "/v1/sprites/other/checkpoints"
    run("checkpoint", "list", env={"WISP_SPRITE": "other"})
    assert stub.state.requests[-1][1] == "/v1/sprites/other/checkpoints"
    assert run("use").stdout.startswith("dev  (")
    os.chdir(home / "work")
    assert run("use", "--unset").exit_code == 0
    assert not (home / "work" / ".wisp-sprite").exists()


def test_use_rejects_unknown_sprite_and_missing_selection(run: Any, stub: Stub,
                                                          home: Path) -> None:
    """`use` of an unknown sprite writes nothing (exit 1); a sprite command with no
    selection anywhere is a usage error (exit 2)."""
    result = run("use", "nope")
    assert result.exit_code == 1
    assert not (home / "work" / ".wisp-sprite").exists()
    result = run("checkpoint", "list")
    assert result.exit_code == 2
    assert "wisp use NAME" in result.output


def test_restart(run: Any, stub: Stub, home: Path) -> None:
    """`wisp restart NAME`, `-s NAME` and the selected sprite all POST
    /v1/sprites/{name}/restart; --json prints the reply; an unknown sprite exits 1."""
    stub.state.add("box")
    result = run("restart", "box")
    assert (result.exit_code, result.stdout) == (0, "restarted sprite box\n")
    assert stub.state.requests[-1][:2] == ("POST", "/v1/sprites/box/restart")
    reply = json.loads(run("restart", "-s", "box", "--json").stdout)
    assert reply == {"sprite_name": "box", "machine_id": stub.state.sprites["box"]["id"],
                     "message": "sprite restarted"}
    (home / "work" / ".wisp-sprite").write_text("box\n")
    assert run("restart").exit_code == 0
    assert stub.state.requests[-1][:2] == ("POST", "/v1/sprites/box/restart")
    assert run("restart", "box", "-s", "other").exit_code == 2
    result = run("restart", "ghost")
    assert (result.exit_code, result.stderr) == (1, "error: sprite 'ghost' not found\n")


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_create_human_and_json(run: Any, stub: Stub) -> None:
    """Human mode prints the progress lines (stderr) and the completion (stdout); --json
    prints one JSON object per line ending with `complete`."""
    stub.state.add("cp")
    result = run("checkpoint", "create", "-s", "cp", "-m", "first")
    assert result.exit_code == 0, result.output
    assert "Creating checkpoint..." in result.stderr
    assert result.stdout == "Checkpoint v0 created\n"
    assert stub.state.checkpoints["cp"][0]["comment"] == "first"
    result = run("checkpoint", "create", "-s", "cp", "--json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["type"] for e in events] == ["info", "complete"]
    assert events[-1]["id"] == "v1"


def test_checkpoint_error_event_exits_1(run: Any, stub: Stub) -> None:
    """An `error` event in the progress stream is reported and exits 1 (both modes)."""
    stub.state.add("cp")
    result = run("checkpoint", "create", "-s", "cp", "-m", "fail")
    assert result.exit_code == 1
    assert result.stderr.endswith("error: Checkpoint failed: disk full\n")
    result = run("checkpoint", "create", "-s", "cp", "-m", "fail", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout.splitlines()[-1])["type"] == "error"


def test_checkpoint_list_show_delete_restore(run: Any, stub: Stub) -> None:
    """list --json is the server's array; show; restore follows progress; deleting the
    checkpoint in use is a 409 (exit 1); deleting another one works; unknown is 404."""
    stub.state.add("cp")
    for _ in range(2):
        assert run("checkpoint", "create", "-s", "cp").exit_code == 0
    items = json.loads(run("checkpoint", "list", "-s", "cp", "--json").stdout)
    assert [c["id"] for c in items] == ["v1", "v0"]
    assert "v1" in run("checkpoint", "list", "-s", "cp").stdout
    assert json.loads(run("checkpoint", "show", "v0", "-s", "cp", "--json").stdout)["id"] == "v0"
    result = run("restore", "v0", "-s", "cp")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Restored to v0\n"
    assert "Restoring filesystem..." in result.stderr
    result = run("checkpoint", "delete", "v0", "-s", "cp")
    assert (result.exit_code, result.stderr) == (1, "error: checkpoint v0 is in use\n")
    assert run("checkpoint", "delete", "v1", "-s", "cp").exit_code == 0
    assert ("DELETE", "/v1/sprites/cp/checkpoints/v1", "") in stub.state.requests
    result = run("restore", "v9", "-s", "cp")
    assert (result.exit_code, result.stderr) == (1, "error: checkpoint v9 not found\n")


# --------------------------------------------------------------------------- exec


def test_exec_stdout_and_query(run: Any, stub: Stub) -> None:
    """exec builds the contract's query (cmd repeated, path, env, dir, stdin) and writes
    stdout exactly; options stop at the first word of the command."""
    stub.state.add("box")
    result = run("exec", "-s", "box", "echo", "hello", "-n", "world")
    assert (result.exit_code, result.stdout) == (0, "hello -n world\n")
    result = run("exec", "-s", "box", "-e", "A=1", "--env", "B=x=y", "--dir", "/tmp",
                  "--", "report", "arg")
    query = json.loads(result.stdout)
    assert query == {"cmd": ["report", "arg"], "path": "report", "env": ["A=1", "B=x=y"],
                     "dir": "/tmp", "tty": False, "stdin": "true", "rows": None, "cols": None}


def test_exec_streams_and_exit_code(run: Any, stub: Stub) -> None:
    """stdout and stderr stay separate and the CLI exits with the remote exit code."""
    stub.state.add("box")
    result = run("exec", "-s", "box", "fail", "42")
    assert result.exit_code == 42
    assert result.stdout == "out\n"
    assert result.stderr == "boom\n"


def test_exec_forwards_stdin_bytes(run: Any, stub: Stub) -> None:
    """A piped stdin is forwarded byte for byte (0x00 frames, then 0x04 EOF)."""
    stub.state.add("box")
    payload = bytes(range(256)) * 300
    result = run("exec", "-s", "box", "cat", input=payload)
    assert result.exit_code == 0
    assert result.stdout_bytes == payload


def test_exec_unknown_sprite_and_lost_connection(run: Any, stub: Stub) -> None:
    """A rejected upgrade shows the JSON error body (exit 1); a connection that closes
    before the exit status exits 255 with an explanation."""
    result = run("exec", "-s", "ghost", "echo")
    assert (result.exit_code, result.stderr) == (1, "error: sprite 'ghost' not found\n")
    stub.state.add("box")
    result = run("exec", "-s", "box", "lose")
    assert result.exit_code == 255
    assert "closed before the command's exit status (close code 1011" in result.stderr


def test_exec_forwards_sigint(run: Any, stub: Stub) -> None:
    """Ctrl-C during a non-TTY exec is sent to the sprite as {"type":"signal","signal":"INT"}
    (the server advertises the `signal` capability), not acted on locally."""
    stub.state.add("box")

    def interrupt() -> None:
        if stub.state.waiting_for_signal.wait(10):
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    killer = threading.Thread(target=interrupt, daemon=True)
    killer.start()
    result = run("exec", "-s", "box", "wait-signal")
    killer.join(10)
    assert (result.exit_code, result.stdout) == (130, "got INT\n")
    assert signal.getsignal(signal.SIGINT) is before


def test_exec_tty_echo_and_exit_message(run: Any, stub: Stub) -> None:
    """--tty sends raw keystrokes, prints raw output and takes the code from the exit
    message; with only a close code 4000+N the code is N."""
    stub.state.add("box")
    result = run("exec", "-s", "box", "--tty", "tty-echo", input=b"hi\nexit\n")
    assert result.exit_code == 3
    assert result.stdout_bytes == b"tty ready\r\nhi\nexit\n"
    assert stub.state.exec_queries[-1]["tty"] is True
    result = run("exec", "-s", "box", "-t", "tty-close")
    assert (result.exit_code, result.stdout_bytes) == (5, b"bye\r\n")


def test_console_default_command(run: Any, stub: Stub) -> None:
    """console runs a login shell in a TTY (bash if present, else sh) with TERM set."""
    stub.state.add("box")
    result = run("console", "-s", "box", env={"TERM": "vt100"})
    assert result.exit_code == 0, result.output
    query = stub.state.exec_queries[-1]
    assert query["cmd"] == list(CONSOLE_CMD) and query["tty"] is True
    assert "TERM=vt100" in query["env"]
    run("console", "-s", "box", "top", "-b")
    assert stub.state.exec_queries[-1]["cmd"] == ["top", "-b"]


# --------------------------------------------------------------------------- client


def test_client_exec_url_and_errors(stub: Stub) -> None:
    """exec_url maps http→ws and percent-encodes the sprite name; ApiError carries the
    status and machine code; a closed port raises ConnectError."""
    with Client("https://h:1/", "t") as c:
        url = c.exec_url("a/b", ["sh", "-c", "echo hi"], tty=True, rows=40, cols=120,
                         env={"K": "v w"})
        assert url == ("wss://h:1/v1/sprites/a%2Fb/exec?cmd=sh&cmd=-c&cmd=echo+hi&path=sh"
                       "&env=K%3Dv+w&tty=true&rows=40&cols=120&stdin=true")
    with Client(stub.url, TOKEN) as c:
        with pytest.raises(ApiError) as info:
            c.get_sprite("ghost")
        assert (info.value.status, info.value.code) == (404, "sprite_not_found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", TOKEN) as c, pytest.raises(ConnectError):
        c.get_sprite("x")


# --------------------------------------------------------------------------- local commands


def test_image_list_empty_store(home: Path) -> None:
    """`wisp image list --json` works locally, without any server, on an empty store."""
    pytest.importorskip("wisp.images", reason="wisp.images is not written yet")
    result = CliRunner().invoke(cli, ["image", "list", "--data-dir", str(home / "data"),
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_image_build_busybox_and_list(home: Path) -> None:
    """`wisp image build --busybox` builds through ImageStore (no server) and the new
    image shows up in `image list`, as a table and as JSON."""
    pytest.importorskip("wisp.images", reason="wisp.images is not written yet")
    if os.geteuid() != 0 or not Path("/bin/busybox").is_file():
        pytest.skip("needs root and busybox-static")
    data = str(home / "data")
    result = CliRunner().invoke(cli, ["image", "build", "--busybox", "--data-dir", data],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("image busybox version ")
    images = json.loads(CliRunner().invoke(
        cli, ["image", "list", "--data-dir", data, "--json"]).stdout)
    assert [(i["name"], i["source"]) for i in images] == [("busybox", "busybox")]
    assert Path(images[0]["rootfs"]).is_dir() and images[0]["size_bytes"] > 0
    table = CliRunner().invoke(cli, ["image", "list", "--data-dir", data]).stdout
    assert table.split()[:5] == ["NAME", "VERSION", "SIZE", "CREATED", "SOURCE"]
    result = CliRunner().invoke(cli, ["image", "build", "Bad Name", "--busybox",
                                      "--data-dir", data])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("error: invalid image name")


def test_serve_help_is_local(home: Path) -> None:
    """`wisp serve --help` needs no server configuration and documents the defaults."""
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "127.0.0.1:7770" in result.output and "/var/lib/wisp" in result.output
    assert isinstance(cli, click.Group)


# --------------------------------------------------------------------------- terminal


def _run_in_terminal(args: list[str], env: dict[str, str], timeout: float = 60) -> bytes:
    """Run `wisp ARGS` with stdin, stdout and stderr on one pseudo-terminal (as a user at
    a shell would) and return everything the terminal received."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "wisp.cli", *args], stdin=slave,
                            stdout=slave, stderr=slave, env=env, cwd=REPO,
                            start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"wisp {args} still running; output so far {out!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    return out


def _text_before(out: bytes, marker: bytes) -> bytes:
    """What the terminal line holding `marker` shows left of it (escape codes removed)."""
    head = out[:out.index(marker)]
    line = re.split(rb"[\r\n]", head)[-1]
    return re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", line)


@pytest.mark.parametrize("args, message", [
    (["checkpoint", "create", "-s", "box", "-m", "fail"],
     b"error: Checkpoint failed: disk full\r\n"),
    (["exec", "-s", "box", "partial-lose"], b"error: connection closed"),
    (["exec", "-t", "-s", "box", "tty-lose"], b"error: connection closed"),
], ids=["progress-spinner", "exec-partial-line", "tty-exec-prompt"])
def test_error_line_starts_its_own_line_on_a_terminal(stub: Stub, home: Path, args: list[str],
                                                      message: bytes) -> None:
    """On a terminal, `error: ...` is a line of its own that ends with a newline: not
    glued to the progress spinner (checkpoint error event) nor to a remote command's last
    unfinished output line (connection lost in exec and in a TTY exec)."""
    stub.state.add("box")
    env = {**os.environ, "WISP_API": stub.url, "WISP_TOKEN": TOKEN, "TERM": "xterm-256color",
           "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"), "PYTHONPATH": str(REPO)}
    env.pop("WISP_SPRITE", None)
    out = _run_in_terminal(args, env)
    assert message in out, out
    assert _text_before(out, b"error:") == b"", out
    tail = out[out.index(b"error:"):]
    assert tail.endswith(b"\r\n") and tail.count(b"\n") == 1, out


# --------------------------------------------------------------------------- set-up


def test_make_links_wisp_onto_the_path(tmp_path: Path) -> None:
    """`make bin` (a step of `make install`, so of `make run` and `make test`) links
    BINDIR/wisp to the venv's script: the `wisp` that `make run` tells you to try is then
    found on the PATH and runs this checkout's CLI."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    r = subprocess.run(["make", "-s", "-C", str(REPO), "bin", f"BINDIR={bindir}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    found = subprocess.run(["bash", "-c", "command -v wisp && wisp --version"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    path, version = found.stdout.splitlines()
    assert os.path.samefile(path, REPO / ".venv" / "bin" / "wisp")
    assert version.startswith("wisp, version ")
