"""Routes for a sprite's services (contract §2.11, §5.2). Each parses, calls one core
function, replies. `POST …/services/signal` is the signal endpoint, not a service named
"signal" (contract §2.11)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wisp.api.common import json_body, ndjson, query_int
from wisp.errors import BadRequest
from wisp.exec.params import parse_duration, parse_signal
from wisp.services import DEFAULT_DURATION, DEFAULT_LOG_LINES, DEFAULT_STOP_TIMEOUT, SpriteServices

__all__ = ["services_routes"]

#: Longest follow window or stop timeout a request may ask for.
MAX_WAIT = 3600.0


def _seconds(request: Request, key: str, default: float) -> float:
    value = parse_duration(request.query_params.get(key), default)
    if value > MAX_WAIT:
        raise BadRequest(f"{key} must be at most {MAX_WAIT:g} seconds")
    return value


def services_routes(services: SpriteServices) -> list[BaseRoute]:
    def names(request: Request) -> tuple[str, str]:
        return request.path_params["name"], request.path_params["svc"]

    async def list_(request: Request) -> Response:
        return JSONResponse(await services.list(request.path_params["name"]))

    async def get(request: Request) -> Response:
        return JSONResponse(await services.get(*names(request)))

    async def put(request: Request) -> Response:
        duration = _seconds(request, "duration", DEFAULT_DURATION)
        body = await json_body(request)
        return await ndjson(await services.put(*names(request), body, duration))

    async def delete(request: Request) -> Response:
        await services.delete(*names(request))
        return Response(status_code=204)

    async def start(request: Request) -> Response:
        duration = _seconds(request, "duration", DEFAULT_DURATION)
        return await ndjson(await services.start(*names(request), duration))

    async def stop(request: Request) -> Response:
        timeout = _seconds(request, "timeout", DEFAULT_STOP_TIMEOUT)
        return await ndjson(await services.stop(*names(request), timeout))

    async def restart(request: Request) -> Response:
        duration = _seconds(request, "duration", DEFAULT_DURATION)
        return await ndjson(await services.restart(*names(request), duration))

    async def logs(request: Request) -> Response:
        lines = query_int(request, "lines", DEFAULT_LOG_LINES)
        if not 0 <= lines <= 100_000:
            raise BadRequest("lines must be between 0 and 100000")
        duration = _seconds(request, "duration", 0.0)
        return await ndjson(await services.logs(*names(request), lines, duration))

    async def signal(request: Request) -> Response:
        body = await json_body(request)
        svc = body.get("name")
        if not isinstance(svc, str) or not svc:
            raise BadRequest("name is required: the service to signal")
        sig = body.get("signal")
        if not isinstance(sig, (str, int)) or sig == "":
            raise BadRequest("signal is required, e.g. \"SIGTERM\"")
        await services.signal(request.path_params["name"], svc, parse_signal(sig))
        return Response(status_code=204)

    base = "/v1/sprites/{name}/services"
    return [
        Route(base, list_, methods=["GET"]),
        Route(base + "/signal", signal, methods=["POST"]),
        Route(base + "/{svc}", get, methods=["GET"]),
        Route(base + "/{svc}", put, methods=["PUT"]),
        Route(base + "/{svc}", delete, methods=["DELETE"]),
        Route(base + "/{svc}/start", start, methods=["POST"]),
        Route(base + "/{svc}/stop", stop, methods=["POST"]),
        Route(base + "/{svc}/restart", restart, methods=["POST"]),
        Route(base + "/{svc}/logs", logs, methods=["GET"]),
    ]
