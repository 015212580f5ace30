"""Routes for sprite URLs (Wisp extension): the one-time link a browser opens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wisp.api.common import json_body

if TYPE_CHECKING:
    from wisp.urls import SpriteUrls

__all__ = ["url_routes"]


def url_routes(urls: SpriteUrls) -> list[BaseRoute]:
    async def link(request: Request) -> Response:
        body = await json_body(request)
        made = urls.link(request.path_params["name"], body.get("port"), body.get("path"))
        return JSONResponse(made, status_code=201)

    return [Route("/v1/sprites/{name}/url/link", link, methods=["POST"])]
