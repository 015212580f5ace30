"""Routes for a sprite's resources policy (contract §2.12, docs/resources.md). Each
parses, calls one core function, replies."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wisp.api.common import json_body
from wisp.resources import Resources

__all__ = ["resources_routes"]


def resources_routes(resources: Resources) -> list[BaseRoute]:
    async def get(request: Request) -> Response:
        return JSONResponse(await resources.get(request.path_params["name"]))

    async def set_(request: Request) -> Response:
        return JSONResponse(await resources.set(request.path_params["name"],
                                                await json_body(request)))

    async def clear(request: Request) -> Response:
        return JSONResponse(await resources.clear(request.path_params["name"]))

    path = "/v1/sprites/{name}/policy/resources"
    return [Route(path, get, methods=["GET"]), Route(path, set_, methods=["POST"]),
            Route(path, clear, methods=["DELETE"])]
