"""Routes for sprites, checkpoints and fork. Each parses, calls one core function, replies."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wisp.api.common import json_body, ndjson, query_bool, query_int
from wisp.errors import BadRequest
from wisp.sprites import RUNTIMES, check_lifecycle, check_url_settings

if TYPE_CHECKING:
    from wisp.server import Services

__all__ = ["sprite_routes"]


def _string_list(value: object, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BadRequest(f"{field} must be an array of strings")
    return value


def _string_map(value: object, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadRequest(f"{field} must be an object of strings")
    return value


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _untoken(token: str) -> str:
    try:
        name = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        name = ""
    if not name:
        raise BadRequest("continuation_token is not one this server issued")
    return name


def _runtime(value: object) -> str | None:
    """The create body's `runtime`: the contract's "default" and "dev" (and none) mean the
    server's default driver; "container" or "vm" choose one (docs/vm.md)."""
    if value is None or value in ("default", "dev"):
        return None
    if value not in RUNTIMES:
        raise BadRequest(f"runtime must be one of default, dev, {', '.join(RUNTIMES)}")
    return str(value)


def sprite_routes(svc: Services) -> list[BaseRoute]:
    sprites, checkpoints = svc.sprites, svc.checkpoints

    async def create(request: Request) -> Response:
        body = await json_body(request)
        if "name" not in body:
            raise BadRequest("name is required")
        config = body.get("config")
        if config is not None and not isinstance(config, dict):
            raise BadRequest("config must be an object")
        url_settings = body.get("url_settings")
        lifecycle = {k: v for k, v in check_lifecycle(body.get("lifecycle")).items()
                     if v is not None}
        row = await sprites.create(
            body["name"],
            labels=_string_list(body.get("labels"), "labels"),
            url_settings=check_url_settings(url_settings) if url_settings is not None else {},
            environment=_string_map(body.get("environment"), "environment"),
            lifecycle=lifecycle, runtime=_runtime(body.get("runtime")))
        out = sprites.to_json(row)
        sprites.prestart(row.name)  # a no-op when the create handed out a warm sprite
        return JSONResponse(out, status_code=201)

    async def list_(request: Request) -> Response:
        prefix = request.query_params.get("prefix", "")
        limit = min(max(query_int(request, "max_results", 50), 1), 500)
        token = request.query_params.get("continuation_token") or ""
        after = _untoken(token) if token else ""
        query_bool(request, "bulk_load")  # accepted; every listing is a bulk load here
        rows = sprites.store.sprites(prefix=prefix, after=after, limit=limit + 1)
        has_more = len(rows) > limit
        rows = rows[:limit]
        counts = sprites.counts()
        org = {"name": sprites.config.org, **counts, "running_limit": 1000,
               "warm_limit": 1000}
        out: dict[str, Any] = {"sprites": [sprites.to_json(r) for r in rows],
                               "has_more": has_more, **org, "org": org}
        if has_more:
            out["next_continuation_token"] = _token(rows[-1].name)
        return JSONResponse(out)

    async def get(request: Request) -> Response:
        return JSONResponse(sprites.to_json(sprites.row(request.path_params["name"])))

    async def update(request: Request) -> Response:
        body = await json_body(request)
        row = await sprites.update(request.path_params["name"], body)
        return JSONResponse(sprites.to_json(row))

    async def delete(request: Request) -> Response:
        await sprites.delete(request.path_params["name"])
        return Response(status_code=204)

    async def upgrade(request: Request) -> Response:
        row = await sprites.upgrade(request.path_params["name"])
        return JSONResponse(sprites.to_json(row))

    async def restart(request: Request) -> Response:
        row = await sprites.restart(request.path_params["name"])
        return JSONResponse({"sprite_name": row.name, "machine_id": row.id,
                             "message": f"sprite '{row.name}' restarted"})

    async def fork(request: Request) -> Response:
        body = await json_body(request)
        source = sprites.row(request.path_params["name"])
        cp = body.get("checkpoint")
        if cp is not None:
            if not isinstance(cp, str):
                raise BadRequest("checkpoint must be a string")
            checkpoints.get(source.name, cp)
        if "name" not in body:
            raise BadRequest("name is required")
        row = await sprites.create(body["name"],
                                   labels=_string_list(body.get("labels"), "labels"),
                                   environment=dict(source.environment),
                                   source=(source, cp),
                                   lifecycle=source.config.get("lifecycle"))
        return JSONResponse(sprites.to_json(row), status_code=201)

    async def checkpoint_create(request: Request) -> Response:
        body = await json_body(request)
        row = await checkpoints.prepare_create(request.path_params["name"], body.get("comment"))
        return await ndjson(checkpoints.create(row, body.get("comment") or ""))

    async def checkpoint_list(request: Request) -> Response:
        cps = checkpoints.list(request.path_params["name"],
                               request.query_params.get("history") or None)
        return JSONResponse([checkpoints.to_json(c) for c in cps])

    async def checkpoint_get(request: Request) -> Response:
        cp = checkpoints.get(request.path_params["name"], request.path_params["cp"])
        return JSONResponse(checkpoints.to_json(cp))

    async def checkpoint_restore(request: Request) -> Response:
        row, cp = checkpoints.prepare_restore(request.path_params["name"],
                                              request.path_params["cp"])
        memory = query_bool(request, "memory", default=True)  # extension: docs/vm.md
        return await ndjson(checkpoints.restore(row, cp, memory))

    async def checkpoint_delete(request: Request) -> Response:
        await checkpoints.delete(request.path_params["name"], request.path_params["cp"])
        return Response(status_code=204)

    return [
        Route("/v1/sprites", create, methods=["POST"]),
        Route("/v1/sprites", list_, methods=["GET"]),
        Route("/v1/sprites/{name}", get, methods=["GET"]),
        Route("/v1/sprites/{name}", update, methods=["PUT"]),
        Route("/v1/sprites/{name}", delete, methods=["DELETE"]),
        Route("/v1/sprites/{name}/upgrade", upgrade, methods=["POST"]),
        Route("/v1/sprites/{name}/restart", restart, methods=["POST"]),
        Route("/v1/sprites/{name}/fork", fork, methods=["POST"]),
        Route("/v1/sprites/{name}/checkpoint", checkpoint_create, methods=["POST"]),
        Route("/v1/sprites/{name}/checkpoints", checkpoint_list, methods=["GET"]),
        Route("/v1/sprites/{name}/checkpoints/{cp}", checkpoint_get, methods=["GET"]),
        Route("/v1/sprites/{name}/checkpoints/{cp}", checkpoint_delete, methods=["DELETE"]),
        Route("/v1/sprites/{name}/checkpoints/{cp}/restore", checkpoint_restore,
              methods=["POST"]),
    ]
