"""Routes for a sprite's network policy (contract §2.12). Each parses, calls one core
function, replies."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wisp.api.common import json_body
from wisp.policies import Policies

__all__ = ["policy_routes"]


def policy_routes(policies: Policies) -> list[BaseRoute]:
    async def get_network(request: Request) -> Response:
        return JSONResponse(await policies.get(request.path_params["name"]))

    async def set_network(request: Request) -> Response:
        await policies.set(request.path_params["name"], await json_body(request))
        return Response(status_code=204)

    return [
        Route("/v1/sprites/{name}/policy/network", get_network, methods=["GET"]),
        Route("/v1/sprites/{name}/policy/network", set_network, methods=["POST"]),
    ]
