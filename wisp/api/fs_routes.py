"""`/v1/sprites/{name}/fs/*` (contract §4): parse the request, call `wisp.filesystem`, shape
the reply.

Every filesystem failure, including a bad query value or body field, is answered here with
the errno-coded body of contract §1.2 (b) (`{"error", "code", "path"}`), so these routes do
not depend on the app's handler for `FsError`. Only `resolve` errors (`SpriteNotFound` and
other `WispError`s) propagate to the app.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from wisp.api.common import parse_json_object
from wisp.errors import BadRequest, FsError
from wisp.filesystem import MAX_WRITE_BYTES, Filesystem, resolve_path
from wisp.runtime.base import SpriteHandle

__all__ = ["fs_routes", "default_filesystem"]

Resolver = Callable[[str], Awaitable[SpriteHandle]]
Handler = Callable[[Request, SpriteHandle, Filesystem], Awaitable[Response]]

#: JSON bodies of rename/copy/chmod/chown/delete are tiny; anything bigger is refused.
MAX_JSON_BYTES = 1 << 20
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")

_default: Filesystem | None = None


def default_filesystem() -> Filesystem:
    """The process-wide `Filesystem` used when `fs_routes` is not given one."""
    global _default
    if _default is None:
        _default = Filesystem()
    return _default


class _JSON(JSONResponse):
    """ASCII-escaped JSON: a file name that is not valid UTF-8 reaches us as lone surrogates
    (`os.fsdecode`), which plain `JSONResponse` cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def _fail(err: FsError, status: int | None = None) -> Response:
    return _JSON(err.body(), status_code=status or err.status)


# ------------------------------------------------------------------------ value parsing

def _flag(value: Any, key: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise FsError("EINVAL", f"{key} must be true or false, not {value!r}")


def _mode(value: Any, key: str = "mode") -> int:
    """A mode as the contract sends it: an octal string (`"0755"`, `"755"`, `"0o755"`).
    A JSON number is taken as the mode's value (493 == 0o755)."""
    if isinstance(value, bool):
        raise FsError("EINVAL", f"{key} must be an octal string like \"0644\", not {value!r}")
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not text or len(text) > 6 or any(c not in "01234567" for c in text):
            raise FsError("EINVAL", f"{key} must be an octal string like \"0644\", "
                          f"not {value!r}")
        mode = int(text, 8)
    else:
        raise FsError("EINVAL", f"{key} must be an octal string like \"0644\", not {value!r}")
    if not 0 <= mode <= 0o7777:
        raise FsError("EINVAL", f"{key} {value!r} is out of range (0000-7777)")
    return mode


def _string(value: Any, key: str, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise FsError("EINVAL", f"missing required field {key!r}")
        return None
    if not isinstance(value, str):
        raise FsError("EINVAL", f"{key} must be a string, not {value!r}")
    return value


#: The largest uid/gid chown(2) takes; (uid_t)-1, one more, means "leave unchanged".
MAX_ID = 2**32 - 2


def _owner(value: Any, key: str) -> int | str | None:
    """A uid/gid: a number in 0..MAX_ID (also as a string of ASCII digits) or a user/group
    name."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise FsError("EINVAL", f"{key} must be a number or a name, not {value!r}")
    if isinstance(value, str) and value.isdigit():  # "²" is a digit to str.isdigit()
        if not value.isascii():
            raise FsError("EINVAL", f"{key} must be a number or a name, not {value!r}")
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise FsError("EINVAL", f"{key} must not be negative")
        if value > MAX_ID:
            raise FsError("EINVAL", f"{key} must be at most {MAX_ID}")
        return value
    if isinstance(value, str) and value and ":" not in value and "\n" not in value:
        return value
    raise FsError("EINVAL", f"{key} must be a number or a name, not {value!r}")


class _BodyTooLarge(FsError):
    """A JSON body over MAX_JSON_BYTES: the errno body (EINVAL), with the 413 that every
    other capped body of the API gets."""

    def __init__(self) -> None:
        super().__init__("EINVAL", f"request body is larger than {MAX_JSON_BYTES} bytes")

    @property
    def status(self) -> int:
        return 413


async def _body(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        raise _BodyTooLarge()
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BYTES:
            raise _BodyTooLarge()
    try:
        return parse_json_object(bytes(raw))
    except BadRequest as exc:
        raise FsError("EINVAL", exc.message) from None


def _path(params: Any, handle: SpriteHandle, key: str = "path") -> str:
    return resolve_path(_string(params.get(key), key, required=True),
                        _string(params.get("workingDir"), "workingDir"), handle.home, key)


# ------------------------------------------------------------------------------ handlers

async def _list(request: Request, handle: SpriteHandle, fs: Filesystem) -> Response:
    q = request.query_params
    path = _path(q, handle)
    result = await fs.list(handle, path, recursive=_flag(q.get("recursive"), "recursive"),
                           pattern=q.get("pattern") or None,
                           as_root=_flag(q.get("asRoot"), "asRoot"))
    return _JSON(result)


async def _read(request: Request, handle: SpriteHandle, fs: Filesystem) -> Response:
    q = request.query_params
    stream = await fs.read(handle, _path(q, handle), as_root=_flag(q.get("asRoot"), "asRoot"))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        finally:  # a client that went away must not leave the worker waiting
            await stream.aclose()

    return StreamingResponse(body(), media_type="application/octet-stream")


async def _write(request: Request, handle: SpriteHandle, fs: Filesystem) -> Response:
    q = request.query_params
    path = _path(q, handle)
    mode = _mode(q["mode"]) if q.get("mode") else None
    parents_key = "mkdirParents" if "mkdirParents" in q else "mkdir"
    parents = _flag(q.get(parents_key), parents_key)
    as_root = _flag(q.get("asRoot"), "asRoot")
    too_big = FsError("EINVAL", f"write {path}: file too large (the limit is "
                      f"{MAX_WRITE_BYTES} bytes)", path)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_WRITE_BYTES:
        return _fail(too_big, 413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_WRITE_BYTES:
            return _fail(too_big, 413)
    result = await fs.write(handle, path, bytes(data), mode=mode, mkdir_parents=parents,
                            as_root=as_root)
    return _JSON(result)


async def _delete(request: Request, handle: SpriteHandle, fs: Filesystem) -> Response:
    params: Any = request.query_params
    if "path" not in params:
        params = await _body(request)  # the OpenAPI form: a JSON body
    result = await fs.delete(handle, _path(params, handle),
                             recursive=_flag(params.get("recursive"), "recursive"),
                             as_root=_flag(params.get("asRoot"), "asRoot"))
    return _JSON(result)


async def _rename(request: Request, handle: SpriteHandle, fs: Filesystem) -> Response:
    b = await _body(request)
    result = await fs.rename(handle, _path(b, handle, "source"), _path(b, handle, "dest"),
                             as_root=_flag(b.get("asRoot"), "asRoot"))
    return _JSON(result)


async def _copy(request: Request, handle: SpriteHandle, fs: Filesystem) -> Response:
    b = await _body(request)
    result = await fs.copy(handle, _path(b, handle, "source"), _path(b, handle, "dest"),
                           recursive=_flag(b.get("recursive"), "recursive"),
                           preserve_attrs=_flag(b.get("preserveAttrs"), "preserveAttrs"),
                           as_root=_flag(b.get("asRoot"), "asRoot"))
    return _JSON(result)


async def _chmod(request: Request, handle: SpriteHandle, fs: Filesystem) -> Response:
    b = await _body(request)
    path = _path(b, handle)
    if b.get("mode") is None:
        raise FsError("EINVAL", "missing required field 'mode'", path)
    result = await fs.chmod(handle, path, _mode(b["mode"]),
                            recursive=_flag(b.get("recursive"), "recursive"),
                            as_root=_flag(b.get("asRoot"), "asRoot"))
    return _JSON(result)


async def _chown(request: Request, handle: SpriteHandle, fs: Filesystem) -> Response:
    b = await _body(request)
    path = _path(b, handle)
    uid, gid = _owner(b.get("uid"), "uid"), _owner(b.get("gid"), "gid")
    result = await fs.chown(handle, path, uid=uid, gid=gid,
                            recursive=_flag(b.get("recursive"), "recursive"),
                            as_root=_flag(b.get("asRoot"), "asRoot"))
    return _JSON(result)


def _endpoint(handler: Handler, resolve: Resolver, fs: Filesystem | None,
              storage: Callable[[], None] | None) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        handle = await resolve(request.path_params["name"])
        try:
            return await handler(request, handle, fs or default_filesystem())
        except FsError as err:
            if err.code == "EIO" and storage is not None:
                storage()  # JuiceFS died under the call: that is a 503, not an EIO
            return _fail(err)

    endpoint.__name__ = f"fs{handler.__name__}"
    return endpoint


def fs_routes(resolve: Resolver, fs: Filesystem | None = None,
              storage: Callable[[], None] | None = None) -> list[BaseRoute]:
    """The eight filesystem endpoints. `resolve` maps a sprite name to a running sprite's
    handle (raising `SpriteNotFound`); `fs` defaults to `default_filesystem()`; `storage`
    raises `StorageUnavailable` while the volume is down (asked when a call fails EIO)."""
    table: list[tuple[str, str, Handler]] = [
        ("list", "GET", _list),
        ("read", "GET", _read),
        ("write", "PUT", _write),
        ("delete", "DELETE", _delete),
        ("rename", "POST", _rename),
        ("copy", "POST", _copy),
        ("chmod", "POST", _chmod),
        ("chown", "POST", _chown),
    ]
    return [Route(f"/v1/sprites/{{name}}/fs/{op}", _endpoint(handler, resolve, fs, storage),
                  methods=[method], name=f"fs_{op}")
            for op, method, handler in table]
