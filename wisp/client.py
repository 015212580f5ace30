"""A small synchronous client for the Wisp HTTP API (the Sprites v1 contract plus Wisp's
extension endpoints), used by the `wisp` CLI and by tests.

It is deliberately thin: one method per endpoint, JSON in and out as `TypedDict`s shaped
exactly like the wire objects (so `--json` output is what the server sent), no retries and
no caching. Every failure is a `ClientError`:

    ClientError                 anything the caller should print as `error: <message>`
    ├── ConfigError             no server configured / unknown context / bad client.json
    ├── ConnectError            the server cannot be reached (refused, DNS, timeout)
    ├── ApiError                the server answered >= 400 with the contract error body
    ├── ProxyError              the port proxy could not reach its target in the sprite
    └── ProtocolError           the server answered something outside the contract

The client configuration is here too, so the server can write, and every client read,
the same `client.json`: named servers ("contexts") and the current one
(`load_client_config`, `edit_client_config`, `register_server`), and the choice of server
for one command (`resolve_endpoint`: options, then WISP_* variables, then a context).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast
from urllib.parse import quote, urlencode

import httpx

from wisp import __version__

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection as AsyncClientConnection
    from websockets.sync.client import ClientConnection

__all__ = [
    "Client",
    "ClientError",
    "ConfigError",
    "ConnectError",
    "ApiError",
    "ProxyError",
    "ProtocolError",
    "Sprite",
    "Checkpoint",
    "ProgressEvent",
    "Service",
    "RestartResult",
    "UrlLink",
    "Context",
    "ClientConfig",
    "Endpoint",
    "LOCAL_CONTEXT",
    "check_context_name",
    "check_api_url",
    "client_config_path",
    "load_client_config",
    "save_client_config",
    "edit_client_config",
    "register_server",
    "resolve_endpoint",
    "discover_endpoint",
    "announce_server",
    "USER_AGENT",
]

USER_AGENT = f"wisp-cli/{__version__}"
#: Page size for `GET /v1/sprites`; the server clamps it, so any value is safe.
PAGE_SIZE = 100
#: Slow operations (they copy or format disks) get a longer deadline than reads.
SLOW_TIMEOUT = 120.0


# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """Base of every client failure; `str(exc)` is the message the CLI prints."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ClientError):
    """No API URL could be found, or the client config file is unreadable."""


class ConnectError(ClientError):
    """The server could not be reached at all (nothing was sent or nothing came back)."""


class ApiError(ClientError):
    """The server answered with status >= 400; `code` is the contract's machine code
    (`sprite_not_found`, ...) or `None` when the body was not the contract JSON."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.body: dict[str, Any] = dict(body or {})


class ProtocolError(ClientError):
    """The server's answer broke the contract (bad JSON, stream ended early, ...)."""


class ProxyError(ClientError):
    """The port proxy answered `{"status": "error"}`: the target refused, timed out or
    was not a valid address (the message is the server's)."""


# --------------------------------------------------------------------------- wire types


class Sprite(TypedDict, total=False):
    """Sprite object, contract §2.1 (only `name` is guaranteed)."""

    id: str
    name: str
    organization: str
    status: str
    url: str
    url_settings: dict[str, Any] | None
    labels: list[str]
    version: str | None
    environment_version: str | None
    created_at: str
    updated_at: str
    last_running_at: str | None
    last_warming_at: str | None
    lifecycle: dict[str, float]


class Task(TypedDict, total=False):
    """A keep-awake task (Wisp extension, docs/lifecycle.md)."""

    name: str
    expires_at: str
    source: str


class Checkpoint(TypedDict, total=False):
    """Checkpoint object, contract §2.10."""

    id: str
    create_time: str
    comment: str
    history: list[str]
    is_auto: bool
    source_id: str | None
    health: str


class ProgressEvent(TypedDict, total=False):
    """One NDJSON line of checkpoint create / restore (contract §2.10). A stream ends with
    exactly one `complete` or `error` event; `id` is Wisp's extra field naming the new
    checkpoint on `complete`."""

    type: Literal["info", "complete", "error"]
    data: str
    error: str
    time: str
    id: str


class Service(TypedDict, total=False):
    """A service and its `state` (contract §5.2)."""

    name: str
    cmd: str
    args: list[str]
    needs: list[str]
    http_port: int | None
    env: dict[str, str]
    dir: str
    state: dict[str, Any] | None


class RestartResult(TypedDict, total=False):
    """Reply of `POST /v1/sprites/{name}/restart` (contract: JS SDK extras)."""

    sprite_name: str
    machine_id: str
    message: str


class UrlLink(TypedDict, total=False):
    """Reply of `POST /v1/sprites/{name}/url/link` (Wisp extension, docs/urls.md)."""

    url: str
    expires_at: str


# --------------------------------------------------------------------------- contexts

#: The context name `wisp serve` registers for the default data dir (/var/lib/wisp).
LOCAL_CONTEXT = "local"
_CONTEXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass
class Context:
    """One named server in client.json. `data_dir` is set when `wisp serve` registered
    the entry (the server's data dir on this host) and None for one added by hand."""

    api: str
    token: str | None = None
    data_dir: str | None = None


@dataclass
class ClientConfig:
    """The whole client.json: named servers ("contexts") and the name of the current one.

    `current` may be None (nothing chosen yet) but never names a missing context once
    loaded: a dangling name reads as None."""

    contexts: dict[str, Context] = field(default_factory=dict)
    current: str | None = None


def check_context_name(name: str) -> str:
    """Return `name` if it is a valid context name (letters, digits, `.`, `_`, `-`; at
    most 63; not starting with punctuation), else raise ConfigError."""
    if not _CONTEXT_NAME.fullmatch(name):
        raise ConfigError(f"invalid context name {name!r}: use letters, digits, '.', '_' "
                          f"and '-' (at most 63, starting with a letter or digit)")
    return name


def check_api_url(api: str) -> str:
    """`api` without a trailing slash; ConfigError unless it is an http(s) URL."""
    if not api.startswith(("http://", "https://")):
        raise ConfigError(f"API URL must start with http:// or https://, got {api!r}")
    return api.rstrip("/")


def client_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/wisp/client.json`, default `~/.config/wisp/client.json`.

    A relative or empty XDG_CONFIG_HOME is ignored, as the XDG spec requires."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "wisp" / "client.json"


def _optional_str(doc: Mapping[str, Any], key: str) -> bool:
    return isinstance(doc.get(key), (str, type(None)))


def _parse_client_config(doc: Any, path: Path) -> ClientConfig:
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    if "contexts" not in doc:
        # The single-server form written before contexts existed: {"api", "token"}. It was
        # always written by `wisp serve`, so it becomes that server's usual name, current.
        if not doc.get("api"):
            return ClientConfig()
        if not (isinstance(doc["api"], str) and _optional_str(doc, "token")):
            raise ConfigError(f'{path} must be a JSON object {{"current": ..., '
                              f'"contexts": {{NAME: {{"api": ..., "token": ...}}}}}}')
        old = Context(doc["api"], doc.get("token") or None)
        return ClientConfig({LOCAL_CONTEXT: old}, LOCAL_CONTEXT)
    contexts: dict[str, Context] = {}
    raw = doc["contexts"]
    if not isinstance(raw, dict) or not _optional_str(doc, "current"):
        raise ConfigError(f'{path}: "contexts" must be an object and "current" a string')
    for name, entry in raw.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("api"), str)
                and _optional_str(entry, "token") and _optional_str(entry, "data_dir")):
            raise ConfigError(f'{path}: context {name!r} must be an object with a string '
                              f'"api" and optional "token" and "data_dir"')
        contexts[name] = Context(entry["api"], entry.get("token") or None,
                                 entry.get("data_dir") or None)
    current = doc.get("current")
    return ClientConfig(contexts, current if current in contexts else None)


def load_client_config(path: Path | None = None) -> ClientConfig:
    """client.json as a `ClientConfig`: empty when the file does not exist, the old
    single-server form read as one context "local" (rewritten in the new form by the next
    save). Unreadable or malformed files raise ConfigError."""
    path = client_config_path() if path is None else path
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return ClientConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return _parse_client_config(doc, path)


def save_client_config(config: ClientConfig, path: Path | None = None) -> Path:
    """Atomically write client.json with mode 0600 (it holds bearer tokens)."""
    path = client_config_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"current": config.current,
           "contexts": {name: {k: v for k, v in dataclasses.asdict(c).items()
                               if v is not None or k == "token"}
                        for name, c in sorted(config.contexts.items())}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


@contextmanager
def edit_client_config(path: Path | None = None) -> Iterator[ClientConfig]:
    """Load client.json, let the caller change it, save it: under an exclusive lock on a
    file beside it, so two `wisp serve` starting at once (or a serve and a `wisp context`
    command) never lose each other's entry. Nothing is saved if the body raises."""
    path = client_config_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config = load_client_config(path)
        yield config
        save_client_config(config, path)
    finally:
        os.close(lock)


def _same_url(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.rstrip("/") == b.rstrip("/")


def _derived_name(data_dir: Path) -> str:
    from wisp.config import DEFAULT_DATA_DIR

    if data_dir == DEFAULT_DATA_DIR.absolute():
        return LOCAL_CONTEXT
    name = re.sub(r"[^a-z0-9._-]+", "-", data_dir.name.lower()).lstrip("._-")[:60]
    return name or "wisp"


def _taken(config: ClientConfig, name: str, base: str) -> bool:
    """Whether a derived name must not be used: it names a hand-added entry or another
    data dir's server. "local" without a data dir is the exception (the entry migrated
    from the single-server file, or one added by hand under the default server's name),
    which the server on the default data dir takes over."""
    entry = config.contexts.get(name)
    if entry is None:
        return False
    return not (name == base == LOCAL_CONTEXT and entry.data_dir is None)


def register_server(api: str, token: str | None, data_dir: Path, *, name: str | None = None,
                    path: Path | None = None) -> tuple[str, bool]:
    """Record a starting `wisp serve` as a context in client.json; return (name, current).

    The name is `name` if given (replacing any entry of that name); else the name of the
    entry that already records this data dir; else "local" for the default data dir, or the
    data dir's folder name, with `-2`, `-3`, ... appended while that name belongs to
    another data dir or to a hand-added entry (see `_taken`). Other contexts are kept. The server becomes
    the current context only when there is none or the current one is its own name: a
    second server never takes "current" away from the first."""
    data_dir = data_dir.absolute()
    with edit_client_config(path) as config:
        if name is not None:
            check_context_name(name)
        else:
            mine = sorted(n for n, c in config.contexts.items()
                          if c.data_dir == str(data_dir))
            if mine:
                name = config.current if config.current in mine else mine[0]
            else:
                base = candidate = _derived_name(data_dir)
                suffix = 1
                while _taken(config, candidate, base):
                    suffix += 1
                    candidate = f"{base}-{suffix}"
                name = candidate
        config.contexts[name] = Context(api, token, str(data_dir))
        if config.current is None or config.current == name:
            config.current = name
        return name, config.current == name


@dataclass
class Endpoint:
    """Where a client command goes: the API URL, its token, the context it came from (None
    when the URL was given directly) and a note on which setting chose it."""

    api: str
    token: str | None
    context: str | None
    source: str


def resolve_endpoint(api: str | None = None, token: str | None = None, *,
                     context: str | None = None, env: Mapping[str, str] | None = None,
                     config_path: Path | None = None) -> Endpoint:
    """Pick the server for one command.

    URL: `api`, else WISP_API, else the context named by `context` or WISP_CONTEXT, else
    the current context of client.json. Token: `token`, else WISP_TOKEN, else that context's
    token, but only when the URL in use is the context's own: a token saved for one server
    is never sent to another. Naming a context that does not exist is an error even when
    the URL comes from elsewhere (a typo should not pass silently)."""
    env = os.environ if env is None else env
    source = "--api"
    if not api and env.get("WISP_API"):
        api, source = env["WISP_API"], "WISP_API"
    api = api or None
    token = token or env.get("WISP_TOKEN") or None
    chosen_by = "--context"
    if not context and env.get("WISP_CONTEXT"):
        context, chosen_by = env["WISP_CONTEXT"], "WISP_CONTEXT"
    path = client_config_path(env) if config_path is None else config_path
    used: str | None = None
    if api is None or token is None or context:
        config = load_client_config(path)
        if context:
            if context not in config.contexts:
                known = ", ".join(sorted(config.contexts)) or "none"
                raise ConfigError(f"no context {context!r} in {path} (known: {known}); "
                                  f"see `wisp context list`")
            name: str | None = context
        else:
            name, chosen_by = config.current, "current context"
        if name is not None:
            entry = config.contexts[name]
            if api is None:
                api, source = entry.api, f"context {name} ({chosen_by}, {path})"
            if _same_url(entry.api, api):
                used = name
                token = token or entry.token
        elif api is None and config.contexts:
            raise ConfigError(
                f"no current context in {path}: run `wisp context use NAME` (one of "
                f"{', '.join(sorted(config.contexts))}) or pass --context NAME")
    if not api:
        raise ConfigError(
            "no wisp server configured: pass --api URL (and --token), set WISP_API and "
            "WISP_TOKEN, add one with `wisp context add NAME URL`, or start `wisp serve`, "
            f"which registers itself in {path}")
    return Endpoint(check_api_url(api), token, used, source)


def discover_endpoint(api: str | None = None, token: str | None = None, *,
                      context: str | None = None, env: Mapping[str, str] | None = None,
                      config_path: Path | None = None) -> tuple[str, str | None]:
    """`(api, token)` as `resolve_endpoint` picks them (options, env, then client.json)."""
    found = resolve_endpoint(api, token, context=context, env=env, config_path=config_path)
    return found.api, found.token


# --------------------------------------------------------------------------- serve banner


def _cli_program(env: Mapping[str, str]) -> list[str]:
    """How to run this installation's `wisp` from a shell with PATH `env["PATH"]`: plain
    `wisp` when that resolves to this interpreter's script (e.g. the link `make install`
    puts in /usr/local/bin), else the script's absolute path."""
    script = Path(sys.executable).parent / "wisp"
    found = shutil.which("wisp", path=env.get("PATH", os.defpath))
    if found is not None and (not script.exists() or os.path.samefile(found, script)):
        return ["wisp"]
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "wisp.cli"]


def announce_server(api: str, token: str, data_dir: Path, *,
                    env: Mapping[str, str] | None = None) -> str:
    """The block `wisp serve` prints on start, after registering the server as a context
    (see `register_server`; its name from WISP_SERVE_CONTEXT if set) unless
    WISP_NO_CLIENT_CONFIG=1 (test servers) asks to leave client.json alone.

    Its "Try:" line works when pasted into a shell as printed: it names the context when
    this server is not the current one, passes --api/--token when it is in no context,
    and spells out the script's path when `wisp` on the PATH is not this installation's."""
    env = os.environ if env is None else env
    selector: list[str]
    if env.get("WISP_NO_CLIENT_CONFIG") == "1":
        where = "none (WISP_NO_CLIENT_CONFIG=1: client.json left alone)"
        selector = ["--api", api, "--token", token]
    else:
        try:
            name, current = register_server(api, token, data_dir,
                                            name=env.get("WISP_SERVE_CONTEXT") or None,
                                            path=client_config_path(env))
        except (ClientError, OSError) as exc:
            where = f"not saved ({exc})"
            selector = ["--api", api, "--token", token]
        else:
            path = client_config_path(env)
            if current:
                where, selector = f"{name} (current) in {path}", []
            else:
                where = (f"{name} in {path} (not current: `wisp context use {name}` "
                         f"makes it the default)")
                selector = ["--context", name]
    wisp = shlex.join(_cli_program(env) + selector)
    return (f"\nWisp API:  {api}\nToken:     {token}\nContext:   {where}\n"
            f"Try:       {wisp} create hello && {wisp} exec -s hello -- uname -a\n")


# --------------------------------------------------------------------------- client


def _seg(value: str) -> str:
    """Percent-encode one path segment completely (contract §0.1 rule 1)."""
    return quote(value, safe="")


def _api_error(status: int, content: bytes | bytearray) -> ApiError:
    """Decode an error body the way every SDK does (contract §1.2)."""
    text = content.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text) if text else None
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        code = body.get("error") if isinstance(body.get("error"), str) else None
        message = body.get("message") or code or f"API error (status {status})"
        return ApiError(status, str(message), code, body)
    return ApiError(status, text or f"API error (status {status})")


class Client:
    """One API endpoint plus its bearer token; use as a context manager or call `close()`.

    Methods map one-to-one onto endpoints and return the decoded JSON. Streaming
    endpoints return iterators that must be consumed to the end (the HTTP response stays
    open until then)."""

    def __init__(self, api: str, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.api = api.rstrip("/")
        self.token = token
        self.timeout = timeout
        headers = {"User-Agent": USER_AGENT, **self._auth_headers()}
        self._http = httpx.Client(base_url=self.api, headers=headers, timeout=timeout,
                                  transport=transport)

    # -- plumbing

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, timeout: float | None = None,
                 **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, timeout=timeout or self.timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise ConnectError(f"{method} {self.api}{path}: timed out") from exc
        except httpx.TransportError as exc:
            raise ConnectError(f"cannot reach wisp server at {self.api}: {exc}") from exc
        if resp.status_code >= 400:
            raise _api_error(resp.status_code, resp.content)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError as exc:
            raise ProtocolError(f"{method} {path}: response is not JSON") from exc

    def _ndjson(self, method: str, path: str, **kwargs: Any) -> Iterator[ProgressEvent]:
        # No read timeout: the server flushes one line per step and may take a while
        # between steps (copying a large disk); the stream ends when the work ends.
        timeout = httpx.Timeout(self.timeout, read=None)
        try:
            with self._http.stream(method, path, timeout=timeout, **kwargs) as resp:
                if resp.status_code >= 400:
                    raise _api_error(resp.status_code, resp.read())
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ProtocolError(f"{method} {path}: bad NDJSON line {line!r}") \
                            from exc
                    if not isinstance(event, dict):
                        raise ProtocolError(f"{method} {path}: NDJSON line is not an object")
                    yield cast(ProgressEvent, event)
        except httpx.TransportError as exc:
            raise ConnectError(f"cannot reach wisp server at {self.api}: {exc}") from exc

    # -- sprites (contract §2.1-§2.6)

    def list_sprites(self, prefix: str | None = None, *,
                     page_size: int = PAGE_SIZE) -> Iterator[Sprite]:
        """Every sprite (name order), following `next_continuation_token` across pages."""
        token: str | None = None
        seen: set[str] = set()
        while True:
            params: dict[str, str | int] = {"max_results": page_size}
            if prefix:
                params["prefix"] = prefix
            if token:
                params["continuation_token"] = token
            page = self._json("GET", "/v1/sprites", params=params)
            if not isinstance(page, dict) or not isinstance(page.get("sprites", []), list):
                raise ProtocolError("GET /v1/sprites: expected an object with 'sprites'")
            yield from page.get("sprites") or []
            token = page.get("next_continuation_token")
            if not page.get("has_more") or not token:
                return
            if token in seen:
                raise ProtocolError("GET /v1/sprites: continuation token repeats")
            seen.add(token)

    def get_sprite(self, name: str) -> Sprite:
        return cast(Sprite, self._json("GET", f"/v1/sprites/{_seg(name)}"))

    def create_sprite(self, name: str, labels: Sequence[str] | None = None,
                      runtime: str | None = None) -> Sprite:
        """`runtime`: "container" or "vm" (docs/vm.md); None: the server's default."""
        body: dict[str, Any] = {"name": name}
        if labels:
            body["labels"] = list(labels)
        if runtime:
            body["runtime"] = runtime
        return cast(Sprite, self._json("POST", "/v1/sprites", json=body,
                                       timeout=SLOW_TIMEOUT))

    def delete_sprite(self, name: str) -> None:
        self._request("DELETE", f"/v1/sprites/{_seg(name)}", timeout=SLOW_TIMEOUT)

    def fork_sprite(self, source: str, name: str, *, checkpoint: str | None = None,
                    labels: Sequence[str] | None = None) -> Sprite:
        """Wisp extension: a new sprite whose disk starts as `source`'s current disk, or
        as one of its checkpoints."""
        body = {"name": name, "checkpoint": checkpoint, "labels": list(labels or [])}
        return cast(Sprite, self._json("POST", f"/v1/sprites/{_seg(source)}/fork", json=body,
                                       timeout=SLOW_TIMEOUT))

    def restart_sprite(self, name: str) -> RestartResult:
        """End every process in the sprite and start it again on the same disk (the last
        resort for a wedged sprite; its exec sessions end)."""
        return cast(RestartResult, self._json("POST", f"/v1/sprites/{_seg(name)}/restart",
                                              timeout=SLOW_TIMEOUT))

    # -- sleep and keep-awake tasks (Wisp extension, docs/lifecycle.md)

    def sleep_sprite(self, name: str, *, cold: bool = False) -> Sprite:
        """Freeze the sprite now (warm), or stop it (cold); any later call wakes it."""
        return cast(Sprite, self._json("POST", f"/v1/sprites/{_seg(name)}/sleep",
                                       json={"state": "cold" if cold else "warm"},
                                       timeout=SLOW_TIMEOUT))

    def list_tasks(self, name: str) -> list[Task]:
        data = self._json("GET", f"/v1/sprites/{_seg(name)}/tasks")
        if not isinstance(data, list):
            raise ProtocolError("GET tasks: expected an array")
        return cast(list[Task], data)

    def set_task(self, name: str, task: str, ttl: float | str) -> Task:
        """Hold the sprite awake for `ttl` (seconds or a duration like '10m', at most 1 h)."""
        return cast(Task, self._json("PUT", f"/v1/sprites/{_seg(name)}/tasks/{_seg(task)}",
                                     json={"ttl": ttl}, timeout=SLOW_TIMEOUT))

    def delete_task(self, name: str, task: str) -> None:
        self._request("DELETE", f"/v1/sprites/{_seg(name)}/tasks/{_seg(task)}")

    # -- network policy (contract §2.12, §5.3)

    def get_network_policy(self, sprite: str) -> dict[str, Any]:
        data = self._json("GET", f"/v1/sprites/{_seg(sprite)}/policy/network")
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise ProtocolError("GET policy/network: expected an object with 'rules'")
        return data

    def set_network_policy(self, sprite: str, rules: Sequence[Mapping[str, str]]) -> None:
        self._request("POST", f"/v1/sprites/{_seg(sprite)}/policy/network",
                      json={"rules": [dict(r) for r in rules]}, timeout=SLOW_TIMEOUT)

    # -- resources policy (contract §2.12, docs/resources.md)

    def _resources(self, method: str, sprite: str, body: Any = None) -> dict[str, Any]:
        data = self._json(method, f"/v1/sprites/{_seg(sprite)}/policy/resources",
                          **({"json": body} if body is not None else {}),
                          timeout=SLOW_TIMEOUT)
        if not isinstance(data, dict) or not isinstance(data.get("memory"), dict):
            raise ProtocolError(f"{method} policy/resources: expected an object with 'memory'")
        return data

    def get_resources(self, sprite: str) -> dict[str, Any]:
        return self._resources("GET", sprite)

    def set_resources(self, sprite: str, *, memory_mb: int | None = None,
                      cpus: float | None = None) -> dict[str, Any]:
        """Change the limits given (the others keep theirs); applied live."""
        body: dict[str, Any] = {}
        if memory_mb is not None:
            body["memory"] = {"limit_mb": memory_mb}
        if cpus is not None:
            body["cpu"] = {"limit_cpus": cpus}
        return self._resources("POST", sprite, body)

    def clear_resources(self, sprite: str) -> dict[str, Any]:
        """Back to the server's defaults."""
        return self._resources("DELETE", sprite)

    def update_sprite(self, name: str, *, url_settings: Mapping[str, Any] | None = None,
                      labels: Sequence[str] | None = None) -> Sprite:
        """`PUT /v1/sprites/{name}`: only the fields given change (contract §2.5)."""
        body: dict[str, Any] = {}
        if url_settings is not None:
            body["url_settings"] = dict(url_settings)
        if labels is not None:
            body["labels"] = list(labels)
        return cast(Sprite, self._json("PUT", f"/v1/sprites/{_seg(name)}", json=body))

    # -- sprite URLs (Wisp extension, docs/urls.md)

    def url_link(self, name: str, *, port: int | None = None,
                 path: str | None = None) -> UrlLink:
        """A one-time link to the sprite's URL that leaves a session cookie in the browser
        that opens it (short-lived, single use)."""
        body: dict[str, Any] = {}
        if port is not None:
            body["port"] = port
        if path is not None:
            body["path"] = path
        return cast(UrlLink, self._json("POST", f"/v1/sprites/{_seg(name)}/url/link",
                                        json=body))

    # -- checkpoints (contract §2.10)

    def list_checkpoints(self, sprite: str, *, include_auto: bool = False) -> list[Checkpoint]:
        params = {"includeAuto": "true"} if include_auto else {}
        data = self._json("GET", f"/v1/sprites/{_seg(sprite)}/checkpoints", params=params)
        if not isinstance(data, list):
            raise ProtocolError("GET checkpoints: expected a JSON array")
        return cast(list[Checkpoint], data)

    def get_checkpoint(self, sprite: str, checkpoint_id: str) -> Checkpoint:
        return cast(Checkpoint, self._json(
            "GET", f"/v1/sprites/{_seg(sprite)}/checkpoints/{_seg(checkpoint_id)}"))

    def create_checkpoint(self, sprite: str, comment: str | None = None
                          ) -> Iterator[ProgressEvent]:
        """Progress events; the last one is `complete` (its `data` names the id) or
        `error`. The caller decides what an `error` event means; nothing is raised for it."""
        body = {"comment": comment} if comment else {}
        return self._ndjson("POST", f"/v1/sprites/{_seg(sprite)}/checkpoint", json=body)

    def restore_checkpoint(self, sprite: str, checkpoint_id: str,
                           memory: bool = True) -> Iterator[ProgressEvent]:
        """`memory=False`: a VM sprite boots on the checkpoint's disk instead of resuming
        its memory (docs/vm.md)."""
        return self._ndjson(
            "POST", f"/v1/sprites/{_seg(sprite)}/checkpoints/{_seg(checkpoint_id)}/restore",
            **({} if memory else {"params": {"memory": "false"}}))

    def delete_checkpoint(self, sprite: str, checkpoint_id: str) -> None:
        """Wisp extension; 409 when the checkpoint is the one the sprite runs on."""
        self._request("DELETE",
                      f"/v1/sprites/{_seg(sprite)}/checkpoints/{_seg(checkpoint_id)}")

    # -- services (contract §2.11, §5.2)

    def list_services(self, sprite: str) -> list[Service]:
        data = self._json("GET", f"/v1/sprites/{_seg(sprite)}/services")
        if not isinstance(data, list):
            raise ProtocolError("GET services: expected a JSON array")
        return cast(list[Service], data)

    def put_service(self, sprite: str, name: str, body: Mapping[str, Any], *,
                    duration: float | None = None) -> Iterator[dict[str, Any]]:
        """Create or replace and start; the service's events (contract §5.2)."""
        params = {"duration": f"{duration:g}"} if duration is not None else {}
        return self._events("PUT", f"/v1/sprites/{_seg(sprite)}/services/{_seg(name)}",
                            json=dict(body), params=params)

    def start_service(self, sprite: str, name: str, *,
                      duration: float | None = None) -> Iterator[dict[str, Any]]:
        params = {"duration": f"{duration:g}"} if duration is not None else {}
        return self._events("POST", f"/v1/sprites/{_seg(sprite)}/services/{_seg(name)}/start",
                            params=params)

    def stop_service(self, sprite: str, name: str, *,
                     timeout: float | None = None) -> Iterator[dict[str, Any]]:
        params = {"timeout": f"{timeout:g}"} if timeout is not None else {}
        return self._events("POST", f"/v1/sprites/{_seg(sprite)}/services/{_seg(name)}/stop",
                            params=params)

    def service_logs(self, sprite: str, name: str, *, lines: int | None = None,
                     duration: float | None = None) -> Iterator[dict[str, Any]]:
        params: dict[str, str] = {}
        if lines is not None:
            params["lines"] = str(lines)
        if duration is not None:
            params["duration"] = f"{duration:g}"
        return self._events("GET", f"/v1/sprites/{_seg(sprite)}/services/{_seg(name)}/logs",
                            params=params)

    def delete_service(self, sprite: str, name: str) -> None:
        self._request("DELETE", f"/v1/sprites/{_seg(sprite)}/services/{_seg(name)}")

    def _events(self, method: str, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        return cast(Iterator[dict[str, Any]], self._ndjson(method, path, **kwargs))

    # -- exec (contract §3.1)

    def exec_url(self, sprite: str, cmd: Sequence[str], *, tty: bool = False,
                 stdin: bool = True, dir: str | None = None,
                 env: Mapping[str, str] | None = None, rows: int | None = None,
                 cols: int | None = None) -> str:
        """The `ws://…/exec?cmd=…` URL; `http` becomes `ws`, `https` becomes `wss`."""
        if not cmd:
            raise ValueError("cmd must name a program")
        query: list[tuple[str, str]] = [("cmd", c) for c in cmd]
        query.append(("path", cmd[0]))
        query += [("env", f"{k}={v}") for k, v in (env or {}).items()]
        if dir:
            query.append(("dir", dir))
        if tty:
            query.append(("tty", "true"))
            if rows:
                query.append(("rows", str(rows)))
            if cols:
                query.append(("cols", str(cols)))
        query.append(("stdin", "true" if stdin else "false"))
        base = "ws" + self.api[len("http"):]
        return f"{base}/v1/sprites/{_seg(sprite)}/exec?{urlencode(query)}"

    def connect_exec(self, sprite: str, cmd: Sequence[str], **options: Any
                     ) -> ClientConnection:
        """Open the exec WebSocket (options as for `exec_url`). The caller owns framing
        and must close the connection. A rejected upgrade raises `ApiError` from the
        error body, like a REST call."""
        return self._connect_ws(self.exec_url(sprite, cmd, **options), "exec")

    def _connect_ws(self, url: str, what: str) -> ClientConnection:
        from websockets.sync.client import connect

        try:
            return connect(url, additional_headers=self._auth_headers(),
                           user_agent_header=USER_AGENT, open_timeout=self.timeout,
                           max_size=16 << 20, close_timeout=2, legacy=True)
        except Exception as exc:
            raise self._ws_error(exc, what) from exc

    def _ws_error(self, exc: Exception, what: str) -> Exception:
        """The `ClientError` for a failed WebSocket handshake (`exc` itself if unexpected)."""
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        if isinstance(exc, InvalidStatus):
            return _api_error(exc.response.status_code, exc.response.body or b"")
        if isinstance(exc, InvalidHandshake):
            return ProtocolError(f"{what} WebSocket handshake failed: {exc}")
        if isinstance(exc, TimeoutError):
            return ConnectError(f"{what} WebSocket to {self.api}: timed out")
        if isinstance(exc, OSError):
            return ConnectError(f"cannot reach wisp server at {self.api}: {exc}")
        return exc

    # -- port proxy (contract §3.5)

    async def open_proxy(self, sprite: str, port: int, host: str = "localhost"
                         ) -> tuple[AsyncClientConnection, str]:
        """A TCP connection to `host:port` inside the sprite, over the proxy WebSocket:
        (the connection, the target the server dialled as "ip:port"). Only binary frames
        follow, raw bytes both ways; the caller must close it. The server's refusal to
        dial raises `ProxyError`, a rejected upgrade `ApiError`.

        Asynchronous, unlike the rest of the client: a proxied connection carries bytes
        both ways at once, and the synchronous websockets client holds one lock while a
        send blocks that its reader needs, so a full-duplex stream can deadlock there."""
        import asyncio

        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        base = "ws" + self.api[len("http"):]
        try:
            ws = await connect(f"{base}/v1/sprites/{_seg(sprite)}/proxy",
                               additional_headers=self._auth_headers(),
                               user_agent_header=USER_AGENT, open_timeout=self.timeout,
                               max_size=16 << 20, close_timeout=2)
        except Exception as exc:
            raise self._ws_error(exc, "proxy") from exc
        try:
            await ws.send(json.dumps({"host": host, "port": port}))
            reply = await asyncio.wait_for(ws.recv(), self.timeout)
            answer = json.loads(reply) if isinstance(reply, str) else None
        except (ConnectionClosed, TimeoutError, ValueError) as exc:
            await ws.close()
            raise ProtocolError(f"proxy to {host}:{port}: no answer from the server"
                                ) from exc
        except BaseException:
            await ws.close()
            raise
        if isinstance(answer, dict) and answer.get("status") == "connected":
            return ws, str(answer.get("target", f"{host}:{port}"))
        await ws.close()
        if isinstance(answer, dict) and answer.get("status") == "error":
            raise ProxyError(str(answer.get("error") or "the proxy could not connect"))
        raise ProtocolError(f"proxy to {host}:{port}: unexpected answer {reply!r:.200}")
