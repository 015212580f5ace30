"""Routes for sleep and keep-awake tasks (docs/lifecycle.md; extensions to the contract).
Each parses, calls one core function, replies."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wisp.api.common import json_body
from wisp.errors import BadRequest
from wisp.lifecycle import Task, parse_ttl, validate_task_name
from wisp.sprites import Sprites

__all__ = ["lifecycle_routes"]


def _task_json(task: Task) -> dict[str, str]:
    expires = datetime.fromtimestamp(task.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"name": task.name, "expires_at": expires, "source": task.source}


def lifecycle_routes(sprites: Sprites) -> list[BaseRoute]:
    async def sleep(request: Request) -> Response:
        body = await json_body(request)
        state = body.get("state", "warm")
        if state not in ("warm", "cold"):
            raise BadRequest("state must be 'warm' or 'cold'")
        row = await sprites.sleep(request.path_params["name"], state)
        return JSONResponse(sprites.to_json(row))

    async def list_tasks(request: Request) -> Response:
        tasks = await sprites.tasks(request.path_params["name"])
        return JSONResponse([_task_json(t) for t in tasks])

    async def set_task(request: Request) -> Response:
        body = await json_body(request)
        if "ttl" not in body:
            raise BadRequest("ttl is required: seconds, or a duration like '10m'")
        task = await sprites.set_task(request.path_params["name"],
                                      validate_task_name(request.path_params["task"]),
                                      parse_ttl(body["ttl"]))
        return JSONResponse(_task_json(task))

    async def drop_task(request: Request) -> Response:
        sprites.drop_task(request.path_params["name"], request.path_params["task"])
        return Response(status_code=204)

    return [
        Route("/v1/sprites/{name}/sleep", sleep, methods=["POST"]),
        Route("/v1/sprites/{name}/tasks", list_tasks, methods=["GET"]),
        Route("/v1/sprites/{name}/tasks/{task}", set_task, methods=["PUT"]),
        Route("/v1/sprites/{name}/tasks/{task}", drop_task, methods=["DELETE"]),
    ]
