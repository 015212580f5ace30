"""The API contract as a file the code obeys: `openapi.yaml` beside this module, an OpenAPI
3.1 document of every route the server has (docs/api.md). It is read once, and served as
JSON at `GET /v1/openapi.json`, authenticated like every other route.

The tests hold the code to it: every request and response of the test client is validated
against it, Schemathesis fuzzes every HTTP operation, and a test fails when the app's routes
and the document's paths differ (tests/functional/test_openapi.py).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

__all__ = ["document", "openapi_routes", "PATH"]

#: Where the document is served.
PATH = "/v1/openapi.json"


@functools.cache
def _load() -> tuple[dict[str, Any], bytes]:
    text = Path(__file__).with_name("openapi.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError("openapi.yaml is not a mapping")
    return doc, json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def document() -> dict[str, Any]:
    """A fresh copy of the document (callers may change theirs)."""
    return copy.deepcopy(_load()[0])


def openapi_routes() -> list[BaseRoute]:
    async def serve(request: Request) -> Response:
        return Response(_load()[1], media_type="application/json")

    return [Route(PATH, serve, methods=["GET"], name="openapi")]
