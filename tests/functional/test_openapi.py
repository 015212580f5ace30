"""The API document (wisp/api/openapi.yaml) and the server agree.

* The document is valid OpenAPI 3.1 and is what `GET /v1/openapi.json` serves.
* The app's routes and the document's operations are the same set.
* The test client's validator (tests/framework/openapi.py) rejects what the document does
  not allow, so a passing suite means the document was checked.
* Schemathesis fuzzes every HTTP operation of a real server with a bounded number of
  examples: no 5xx, and every status, content type, header and body as documented.
"""

from __future__ import annotations

import collections
import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.strategies as st
import pytest
import schemathesis
import websockets.sync.client as ws_client
from openapi_spec_validator import validate as validate_spec

from tests.framework.openapi import Contract, ContractViolation, ndjson_lines
from tests.framework.server import WispServer
from wisp.api.openapi import PATH as DOC_PATH
from wisp.api.openapi import document
from wisp.errors import BadRequest
from wisp.exec.params import parse_duration

#: The sprite, checkpoint and session the document's examples name; the fuzz run makes them.
EXAMPLE_SPRITE = "my-sprite"
#: A file the probe keeps in its sprite; fuzzed filesystem paths point at it half of the time.
PROBE_FILE = "/home/sprite/fuzz.txt"
#: Examples per operation and generation mode in the fuzzing phase (`WISP_FUZZ_EXAMPLES`).
MAX_EXAMPLES = int(os.environ.get("WISP_FUZZ_EXAMPLES", "40"))
#: A fixed seed keeps the run reproducible; set `WISP_FUZZ_SEED` to explore other inputs.
SEED = int(os.environ.get("WISP_FUZZ_SEED", "20261202"))
#: Operations Schemathesis cannot call: WebSocket-only endpoints (no 2xx but 101).
WEBSOCKET_ONLY = {"attachExecSession", "controlChannel", "proxyPort", "watchPorts"}
#: What argv[0] and `path` of a fuzzed exec become: programs that end by themselves.
SAFE_PROGRAMS = ["echo", "true", "false", "cat", "printenv", "pwd", "no-such-program"]
#: Longest kill timeout a fuzzed request may ask for (a signal the process ignores would
#: otherwise hold the stream open for the whole timeout).
MAX_KILL_WAIT = 1.0


# ---------------------------------------------------------------------------- the document

def test_document_is_valid_openapi_31() -> None:
    """The file is a valid OpenAPI 3.1 document (openapi-spec-validator), every operation
    has a unique operationId, every HTTP answer documents `Sprite-Version`, and every
    WebSocket operation describes its frames."""
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    validate_spec(doc)
    ids = [op["operationId"] for item in doc["paths"].values()
           for method, op in item.items() if method != "parameters"]
    assert len(ids) == len(set(ids)), ids
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            websocket_only = op["operationId"] in WEBSOCKET_ONLY
            if "x-websocket" in op:
                assert method == "get", path
                ws = op["x-websocket"]
                assert "$ref" in ws or ws.get("supported") is False, path
            for status, response in op["responses"].items():
                if ("$ref" in response or status == "101" or websocket_only
                        or response["description"].startswith("WebSocket only")):
                    continue
                assert "Sprite-Version" in response.get("headers", {}), (method, path, status)
    assert set(doc["components"]["x-websockets"]["exec"]) >= {"clientMessages",
                                                                "serverMessages"}


def test_served_document_is_the_file(server: WispServer) -> None:
    """`GET /v1/openapi.json` serves the repository's document, and only with the token."""
    r = server.api("GET", DOC_PATH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == document()
    r = httpx.get(server.url + DOC_PATH, timeout=30)
    assert r.status_code == 401


def _app_operations(tmp: Path) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of the app `wisp serve` builds; a WebSocket route is
    a GET, and Starlette's implicit HEAD of a GET route is left out."""
    from starlette.routing import Route, WebSocketRoute

    from wisp.config import load_config
    from wisp.server import build

    _, app = build(load_config(tmp, "127.0.0.1:1"))
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            found.add(("GET", route.path))
        elif isinstance(route, Route):
            methods = set(route.methods or ())
            if "GET" in methods:
                methods.discard("HEAD")
            found |= {(m, route.path) for m in methods}
        else:  # a Mount or anything else would serve paths this test cannot see
            raise AssertionError(f"unexpected route type {route!r}")
    return found


def test_app_routes_match_the_document(tmp_path: Path) -> None:
    """The server has exactly the document's operations: no route left undocumented, no
    documented operation without a route (HEAD of a GET aside, which Starlette adds)."""
    in_app = _app_operations(tmp_path)
    in_doc = {(m, p) for m, p in Contract().operations() if m != "HEAD"}
    assert sorted(in_app - in_doc) == [], "routes missing from the document"
    assert sorted(in_doc - in_app) == [], "documented operations the app does not serve"
    # a documented HEAD must be one the app answers (it does for every GET route)
    heads = {p for m, p in Contract().operations() if m == "HEAD"}
    assert heads <= {p for m, p in in_app if m == "GET"}


def test_the_validator_rejects_what_the_document_does_not_allow(server: WispServer,
                                                               sprite) -> None:
    """The test client's checks bite: a response field, status or request parameter that
    the document does not have is a `ContractViolation` (so a green suite means checked)."""
    doc = document()
    del doc["components"]["schemas"]["Sprite"]["properties"]["image"]
    del doc["paths"]["/v1/sprites/{name}"]["get"]["responses"]["404"]
    strict = Contract(doc)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        for path in (f"/v1/sprites/{sprite.name}", "/v1/sprites/no-such-sprite"):
            request = http.build_request("GET", path)
            strict.check_request(request)
            response = http.send(request)
            Contract().check_response(request, response)  # the real document is fine
            with pytest.raises(ContractViolation):
                strict.check_response(request, response)
        with pytest.raises(ContractViolation):
            Contract().check_request(http.build_request("GET", "/v1/sprites",
                                                        params={"max_results": "ten"}))
    assert ndjson_lines(b'{"a":1}\n\n{"b":2}\n') == [{"a": 1}, {"b": 2}]


# ------------------------------------------------------------- what the fuzzing found

#: Requests that answered 500 when the fuzz test was written (found by probing the edges of
#: the input the fuzz run sends: huge numbers, non-ASCII digits), and the 400 body code each
#: answers now. `{name}` is a real sprite; the session id is looked up after the
#: parameters are parsed, so any id shows the bug.
FOUND = [
    # a JSON integer past a float's range as the kill timeout: OverflowError
    ("POST", "/v1/sprites/{name}/exec/1/kill", {"content": b'{"timeout": 1' + b"0" * 400
                                                + b"}"}, "bad_request"),
    # "\u00b2" is a digit to str.isdigit() but not to int(): ValueError
    ("POST", "/v1/sprites/{name}/exec/1/kill", {"params": {"signal": "\u00b2"}},
     "bad_request"),
    ("POST", "/v1/sprites/{name}/exec/1/kill", {"json": {"signal": "\u00b2"}}, "bad_request"),
    # a uid/gid past uid_t: OverflowError in the fs agent, reported as a 500 EIO
    ("POST", "/v1/sprites/{name}/fs/chown", {"json": {"path": "/tmp", "uid": 2**32}},
     "EINVAL"),
    ("POST", "/v1/sprites/{name}/fs/chown", {"json": {"path": "/tmp", "gid": 10**30}},
     "EINVAL"),
    ("POST", "/v1/sprites/{name}/fs/chown", {"json": {"path": "/tmp", "gid": "9" * 30}},
     "EINVAL"),
]


@pytest.mark.parametrize("method,path,kw,code", FOUND,
                         ids=[f"{m} {p.rsplit('/', 1)[-1]} {i}" for i, (m, p, _, _)
                              in enumerate(FOUND)])
def test_what_the_fuzzing_found_is_a_400(server: WispServer, sprite, method: str, path: str,
                                         kw: dict[str, Any], code: str) -> None:
    """Each request that made the server answer 500 now gets a 400 with the right body."""
    r = server.api(method, path.format(name=sprite.name), validate_request=False, **kw)
    assert r.status_code == 400, r.text
    body = r.json()
    assert (body.get("error") if "message" in body else body.get("code")) == code, body


@pytest.mark.parametrize("op", ["rename", "copy", "chmod", "chown", "delete"])
def test_an_oversized_fs_body_is_413(server: WispServer, sprite, op: str) -> None:
    """A filesystem JSON body over 1 MiB is refused with 413, as every capped body of the
    API is (it was a 400), in the filesystem error shape."""
    body = b'{"path": "/tmp", "pad": "' + b"x" * (1 << 20) + b'"}'
    r = server.api("DELETE" if op == "delete" else "POST", f"/v1/sprites/{sprite.name}/fs/{op}",
                   content=body, headers={"content-type": "application/json"},
                   validate_request=False)
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "EINVAL"


# ---------------------------------------------------------------------------- fuzzing

class Probe:
    """The real sprite (with checkpoint `v1` and a running TTY session) that fuzzed path
    parameters point at half of the time, so positive paths run, not only 404s. Made
    again whenever a fuzzed request deleted or changed it."""

    #: Operations that may delete or change the probe's sprite, checkpoints or session,
    #: and those that may change its file: after one, that part is checked (and made again).
    CHANGE_SPRITE = {"deleteSprite", "upgradeSprite", "restartSprite", "deleteCheckpoint",
                     "restoreCheckpoint", "killExecSession"}
    CHANGE_FILE = {"fsWrite", "fsDelete", "fsRename", "fsCopy", "fsChmod", "fsChown"}

    def __init__(self, srv: WispServer) -> None:
        self.srv = srv
        self.base = f"/v1/sprites/{EXAMPLE_SPRITE}"
        self.checkpoints: list[str] = ["v0"]
        self.session_id = "1"
        self.stale = {"sprite", "file"}

    def after(self, operation_id: str) -> None:
        if operation_id in self.CHANGE_SPRITE:
            self.stale |= {"sprite", "file"}  # a restore or delete takes the file too
        elif operation_id in self.CHANGE_FILE:
            self.stale.add("file")

    def ensure(self) -> None:
        if "sprite" in self.stale:
            self._ensure_sprite()
        if "file" in self.stale:
            self._ensure_file()
        self.stale.clear()

    def _ensure_sprite(self) -> None:
        base = self.base
        if self.srv.api("GET", base).status_code == 404:
            r = self.srv.api("POST", "/v1/sprites", json={"name": EXAMPLE_SPRITE})
            assert r.status_code == 201, r.text
        cps = [c["id"] for c in self.srv.api("GET", f"{base}/checkpoints").json()]
        if "v1" not in cps and len(cps) < 3:
            r = self.srv.api("POST", f"{base}/checkpoint", json={"comment": "fuzz"})
            assert r.status_code == 200, r.text
            cps = [c["id"] for c in self.srv.api("GET", f"{base}/checkpoints").json()]
        self.checkpoints = cps
        sessions = self.srv.api("GET", f"{base}/exec").json()["sessions"]
        if sessions:
            self.session_id = sessions[-1]["id"]
            return
        url = (self.srv.url.replace("http", "ws", 1)
               + f"{base}/exec?cmd=sleep&cmd=3600&tty=true&stdin=false")
        with ws_client.connect(url, additional_headers=self.srv.headers,
                               open_timeout=30) as ws:
            info = ws.recv(timeout=30)
        assert isinstance(info, str) and "session_info" in info, info
        self.session_id = str(json.loads(info)["session_id"])

    def _ensure_file(self) -> None:
        """PROBE_FILE, the sprite user's, in the user's home. Fuzzed calls may have moved,
        removed or chmodded either (as root they may do anything): then repair as root."""
        write = {"path": PROBE_FILE, "mode": "0644", "mkdirParents": "true"}
        octets = {"content-type": "application/octet-stream"}
        r = self.srv.api("PUT", f"{self.base}/fs/write", params=write, content=b"fuzz\n",
                         headers=octets)
        if r.status_code == 200:
            return
        self.srv.api("DELETE", f"{self.base}/fs/delete",
                     params={"path": PROBE_FILE, "recursive": "true", "asRoot": "true"})
        r = self.srv.api("PUT", f"{self.base}/fs/write", params={**write, "asRoot": "true"},
                         content=b"fuzz\n", headers=octets)
        assert r.status_code == 200, r.text
        home = PROBE_FILE.rsplit("/", 1)[0]
        for path, mode in ((home, "0755"), (PROBE_FILE, "0644")):
            r = self.srv.api("POST", f"{self.base}/fs/chown", json={
                "path": path, "uid": 1000, "gid": 1000, "asRoot": True})
            assert r.status_code == 200, r.text
            r = self.srv.api("POST", f"{self.base}/fs/chmod", json={
                "path": path, "mode": mode, "asRoot": True})
            assert r.status_code == 200, r.text

    def retarget(self, operation_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """The same path parameters, aimed at the probe's sprite, checkpoint and session
        (never at deleting the probe itself, which would only make it again)."""
        out = dict(params)
        if "name" in out and operation_id != "deleteSprite":
            out["name"] = EXAMPLE_SPRITE
        if "cp" in out:
            key = zlib.crc32(repr(out["cp"]).encode())
            out["cp"] = self.checkpoints[key % len(self.checkpoints)]
        if "sid" in out:
            out["sid"] = self.session_id
        return out


def _safe_program(value: Any) -> str:
    return SAFE_PROGRAMS[zlib.crc32(repr(value).encode()) % len(SAFE_PROGRAMS)]


def _bounded_kill_wait(value: Any) -> Any:
    """A kill timeout no longer than MAX_KILL_WAIT (malformed ones stay, for the 400)."""
    try:
        seconds = parse_duration(value, 10.0)
    except (BadRequest, TypeError, ValueError, OverflowError):
        return value
    return value if seconds <= MAX_KILL_WAIT else f"{MAX_KILL_WAIT}s"


def _defuse(operation_id: str, case: schemathesis.Case) -> None:
    """Keep a fuzzed case from running for long: exec only runs programs that end, and a
    kill waits at most MAX_KILL_WAIT. Everything else about the request stays fuzzed."""
    query = case.query if isinstance(case.query, dict) else None
    if operation_id == "execHttp" and query is not None:
        cmd = query.get("cmd")
        if isinstance(cmd, list) and cmd:
            query["cmd"] = [_safe_program(cmd[0]), *cmd[1:]]
        elif isinstance(cmd, str):
            query["cmd"] = _safe_program(cmd)
        if "path" in query:
            query["path"] = _safe_program(query["path"])
        if "cmd" not in query and "path" not in query:
            query["cmd"] = "true"
    if operation_id == "killExecSession":
        in_body = isinstance(case.body, dict) and "timeout" in case.body
        if in_body:
            case.body["timeout"] = _bounded_kill_wait(case.body["timeout"])
        if query is not None and "timeout" in query:
            query["timeout"] = _bounded_kill_wait(query["timeout"])
        elif query is not None and not in_body:  # the default wait is 10 s
            query["timeout"] = f"{MAX_KILL_WAIT}s"


@schemathesis.deserializer("application/x-ndjson")
def _ndjson(ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    return ndjson_lines(response.content)


class RunStats:
    """What the fuzz run sent: examples, seconds and answers per operation."""

    def __init__(self) -> None:
        self.examples: collections.Counter[str] = collections.Counter()
        self.seconds: collections.Counter[str] = collections.Counter()
        self.statuses: dict[str, collections.Counter[int]] = collections.defaultdict(
            collections.Counter)

    def lines(self, elapsed: float) -> list[str]:
        out = [f"schemathesis: {len(self.examples)} operations, "
               f"{sum(self.examples.values())} examples, {elapsed:.0f} s"]
        for label, n in sorted(self.examples.items()):
            answers = " ".join(f"{code}x{k}" for code, k in sorted(self.statuses[label].items()))
            out.append(f"  {n:4d} {self.seconds[label]:5.1f} s  {label}  [{answers}]")
        return out


@pytest.fixture(scope="module")
def run_stats(request: pytest.FixtureRequest) -> Iterator[RunStats]:
    """The fuzz run's counts, printed when the module ends."""
    stats = RunStats()
    started = time.monotonic()
    yield stats
    lines = stats.lines(time.monotonic() - started)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "ignored_auth",
          # more Schemathesis checks to try, comma-separated (docs/api.md, Limitations)
          *filter(None, os.environ.get("WISP_FUZZ_EXTRA_CHECKS", "").split(","))]

#: The fuzz server's probe, once its fixture made it (the hook below reads it when drawing).
_probe: list[Probe] = []


def fuzz_schema(doc: dict[str, Any] | None = None) -> schemathesis.BaseSchema:
    """The document as Schemathesis sees it: every operation but the WebSocket-only ones,
    MAX_EXAMPLES per generation mode, and the checks above. The base URL is given per call
    (the server starts after collection); the token is WispServer's default."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        "headers": {"Authorization": f"Bearer {FUZZ_TOKEN}"},
        "request-timeout": 30,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    })
    schema = schemathesis.openapi.from_dict(doc or document(), config=config)
    schema = schema.exclude(operation_id=sorted(WEBSOCKET_ONLY))

    @schema.hook("flatmap_query")
    def aim_query_at_probe_file(ctx: schemathesis.HookContext, query: Any) -> Any:
        if not isinstance(query, dict) or not isinstance(query.get("path"), str):
            return st.just(query)
        if not ctx.operation or not ctx.operation.path.startswith("/v1/sprites/{name}/fs/"):
            return st.just(query)
        return st.sampled_from([query, {**query, "path": PROBE_FILE}])

    @schema.hook("flatmap_body")
    def aim_body_at_probe_file(ctx: schemathesis.HookContext, body: Any) -> Any:
        if not isinstance(body, dict) or not ctx.operation \
                or not ctx.operation.path.startswith("/v1/sprites/{name}/fs/"):
            return st.just(body)
        key = "source" if "source" in body else "path"
        if not isinstance(body.get(key), str):
            return st.just(body)
        return st.sampled_from([body, {**body, key: PROBE_FILE}])

    @schema.hook("flatmap_path_parameters")
    def aim_at_probe(ctx: schemathesis.HookContext, params: dict[str, Any]) -> Any:
        operation_id = ctx.operation.definition.raw["operationId"] if ctx.operation else ""
        if not _probe or not params:
            return st.just(params)
        return st.sampled_from([params, _probe[0].retarget(operation_id, params)])

    return schema


FUZZ_TOKEN = "test-token"
fuzzed = fuzz_schema()


@pytest.fixture(scope="module")
def fuzz_server(leak_check: Path) -> Iterator[WispServer]:
    """A server of its own: the fuzz run creates, forks and deletes many sprites."""
    srv = WispServer(leak_check / "openapi-fuzz", token=FUZZ_TOKEN)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def probe(fuzz_server: WispServer) -> Iterator[Probe]:
    p = Probe(fuzz_server)
    p.ensure()
    _probe[:] = [p]
    yield p
    _probe.clear()


@fuzzed.parametrize()
def test_schemathesis(case: schemathesis.Case, fuzz_server: WispServer, probe: Probe,
                      run_stats: RunStats) -> None:
    """Every HTTP operation, fuzzed with valid and invalid input (examples, coverage and
    random phases, MAX_EXAMPLES per mode): no 5xx, every status, content type, required
    header and body as the document says, and 401 without the token."""
    operation_id = case.operation.definition.raw["operationId"]
    started = time.monotonic()
    probe.ensure()
    _defuse(operation_id, case)
    label = case.operation.label
    run_stats.examples[label] += 1
    response = case.call(base_url=fuzz_server.url)
    run_stats.statuses[label][response.status_code] += 1
    probe.after(operation_id)
    try:
        case.validate_response(response)
    finally:
        run_stats.seconds[label] += time.monotonic() - started
        if operation_id in ("createSprite", "forkSprite") and response.status_code == 201:
            fuzz_server.api("DELETE", f"/v1/sprites/{response.json()['name']}")


def test_the_fuzz_run_fails_on_an_answer_outside_the_document(server: WispServer,
                                                               sprite) -> None:
    """The fuzz checks bite: with the 404 of `GET /v1/sprites/{name}` taken out of the
    document, fuzzing that one operation fails on the server's (correct) 404."""
    doc = document()
    del doc["paths"]["/v1/sprites/{name}"]["get"]["responses"]["404"]
    operation = fuzz_schema(doc)["/v1/sprites/{name}"]["GET"]

    @hypothesis.settings(max_examples=10, database=None, deadline=None,
                         phases=[hypothesis.Phase.generate])
    @hypothesis.given(case=operation.as_strategy())
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=server.url)

    with pytest.raises(BaseExceptionGroup) as failure:  # Schemathesis's FailureGroup
        fuzz()
    assert "Undocumented status code" in str(failure.value), failure.value
