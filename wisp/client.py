"""A small synchronous client for the Wisp HTTP API (the Sprites v1 contract plus Wisp's
extension endpoints), used by the `wisp` CLI and by tests.

It is deliberately thin: one method per endpoint, JSON in and out as `TypedDict`s shaped
exactly like the wire objects (so `--json` output is what the server sent), no retries and
no caching. Every failure is a `ClientError`:

    ClientError                 anything the caller should print as `error: <message>`
    ├── ConfigError             no server configured / unreadable client.json
    ├── ConnectError            the server cannot be reached (refused, DNS, timeout)
    ├── ApiError                the server answered >= 400 with the contract error body
    └── ProtocolError           the server answered something outside the contract

Endpoint discovery (`discover_endpoint`) is here too, so the server can write, and every
client read, the same `client.json` (`client_config_path`, `write_client_config`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast
from urllib.parse import quote, urlencode

import httpx

from wisp import __version__

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

__all__ = [
    "Client",
    "ClientError",
    "ConfigError",
    "ConnectError",
    "ApiError",
    "ProtocolError",
    "Sprite",
    "Checkpoint",
    "ProgressEvent",
    "client_config_path",
    "load_client_config",
    "write_client_config",
    "discover_endpoint",
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


# --------------------------------------------------------------------------- discovery


def client_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/wisp/client.json`, default `~/.config/wisp/client.json`.

    A relative or empty XDG_CONFIG_HOME is ignored, as the XDG spec requires."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "wisp" / "client.json"


def load_client_config(path: Path | None = None) -> dict[str, str] | None:
    """The saved `{"api", "token"}` pair, or None when the file does not exist."""
    path = client_config_path() if path is None else path
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not all(
            isinstance(doc.get(k), (str, type(None))) for k in ("api", "token")):
        raise ConfigError(f'{path} must be a JSON object {{"api": "...", "token": "..."}}')
    return {k: doc[k] for k in ("api", "token") if doc.get(k)}


def write_client_config(api: str, token: str | None, path: Path | None = None) -> Path:
    """Atomically write client.json with mode 0600 (it holds a bearer token).

    The server calls this on start so that `wisp` on the same host finds it with no flags."""
    path = client_config_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".client.json.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"api": api, "token": token}, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def discover_endpoint(api: str | None = None, token: str | None = None, *,
                      env: Mapping[str, str] | None = None,
                      config_path: Path | None = None) -> tuple[str, str | None]:
    """Find `(api, token)`: explicit arguments, then WISP_API / WISP_TOKEN, then client.json.

    The file's token is only used together with the file's API URL (or when no URL was
    given elsewhere), so a token saved for one server is never sent to another."""
    env = os.environ if env is None else env
    api = api or env.get("WISP_API") or None
    token = token or env.get("WISP_TOKEN") or None
    path = client_config_path(env) if config_path is None else config_path
    saved = load_client_config(path) if (api is None or token is None) else None
    if saved:
        if api is None:
            api = saved.get("api")
        if token is None and saved.get("api", "").rstrip("/") == (api or "").rstrip("/"):
            token = saved.get("token")
    if not api:
        raise ConfigError(
            "no wisp server configured: pass --api URL (and --token), set WISP_API and "
            f"WISP_TOKEN, or start `wisp serve`, which writes {path}")
    if not api.startswith(("http://", "https://")):
        raise ConfigError(f"API URL must start with http:// or https://, got {api!r}")
    return api.rstrip("/"), token


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

    def create_sprite(self, name: str, labels: Sequence[str] | None = None) -> Sprite:
        body: dict[str, Any] = {"name": name}
        if labels:
            body["labels"] = list(labels)
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

    def restore_checkpoint(self, sprite: str, checkpoint_id: str) -> Iterator[ProgressEvent]:
        return self._ndjson(
            "POST", f"/v1/sprites/{_seg(sprite)}/checkpoints/{_seg(checkpoint_id)}/restore")

    def delete_checkpoint(self, sprite: str, checkpoint_id: str) -> None:
        """Wisp extension; 409 when the checkpoint is the one the sprite runs on."""
        self._request("DELETE",
                      f"/v1/sprites/{_seg(sprite)}/checkpoints/{_seg(checkpoint_id)}")

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
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        url = self.exec_url(sprite, cmd, **options)
        try:
            return connect(url, additional_headers=self._auth_headers(),
                           user_agent_header=USER_AGENT, open_timeout=self.timeout,
                           max_size=16 << 20, close_timeout=2, legacy=True)
        except InvalidStatus as exc:
            raise _api_error(exc.response.status_code, exc.response.body or b"") from exc
        except InvalidHandshake as exc:
            raise ProtocolError(f"exec WebSocket handshake failed: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectError(f"exec WebSocket to {self.api}: timed out") from exc
        except OSError as exc:
            raise ConnectError(f"cannot reach wisp server at {self.api}: {exc}") from exc
