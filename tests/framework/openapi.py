"""Every HTTP exchange of the tests, held to the API contract (wisp/api/openapi.yaml).

`Contract.check_request` and `Contract.check_response` validate an httpx request and its
response with openapi-core: the path, method, parameters, body, security, the status code,
the content type, the headers and the body's schema. A mismatch raises `ContractViolation`
with every problem openapi-core reported. Like Firecracker's test client with its swagger
file (tests/framework/http_api.py there), `WispServer.api` runs both on every call.

What the document does not list is still held to its global rules: a path it does not
have answers 404 and a method it does not list answers 405, both with the `Error` body; a
HEAD answers like the path's GET without a body; a 401 looks the same everywhere.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any
from urllib.parse import parse_qsl

import httpx
from jsonschema import Draft202012Validator
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.exceptions import OpenAPIError
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from werkzeug.datastructures import Headers, ImmutableMultiDict

from wisp.api.openapi import document

__all__ = ["Contract", "ContractViolation", "contract", "ndjson_lines"]


class ContractViolation(AssertionError):
    """A request or response outside the API contract."""


def ndjson_lines(data: bytes, **_: str) -> list[Any]:
    """An NDJSON body as the list of its lines' values (the document's schema for it)."""
    return [json.loads(line) for line in data.splitlines() if line.strip()]


class _Request:
    """An httpx request in the shape openapi-core reads (its `Request` protocol)."""

    def __init__(self, request: httpx.Request) -> None:
        self._request = request
        url = request.url
        self.host_url = f"{url.scheme}://{url.netloc.decode()}"
        # The raw path: a percent-encoded `/` stays inside its segment, as on the server.
        self.path = url.raw_path.decode("ascii").split("?", 1)[0]
        self.method = request.method.lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qsl(url.query.decode(), keep_blank_values=True)),
            header=Headers(list(request.headers.multi_items())),
            cookie=ImmutableMultiDict(),
        )

    @property
    def body(self) -> bytes | None:
        try:
            content = self._request.content
        except httpx.RequestNotRead:
            return None
        return content or None

    @property
    def content_type(self) -> str:
        return self._request.headers.get("content-type", "").lower()


class _Response:
    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.headers = Headers(list(response.headers.multi_items()))
        self.data: bytes | None = response.content
        self.content_type = response.headers.get("content-type", "").lower()


def _describe(exc: BaseException) -> str:
    """openapi-core's error and the schema errors under it, one per line (each cut at 300
    characters: the first ones repeat the whole value)."""
    lines = [f"{type(exc).__name__}: {exc}"[:300]]
    seen: set[int] = {id(exc)}
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        for attr in ("schema_errors", "errors"):
            for sub in getattr(current, attr, None) or []:
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                where = "/".join(str(p) for p in getattr(sub, "absolute_path", []) or [])
                message = getattr(sub, "message", None) or str(sub)
                lines.append(f"  - {where or '<body>'}: {message}"[:300])
                if isinstance(sub, BaseException):
                    todo.append(sub)
        for nested in (current.__cause__, current.__context__):
            if isinstance(nested, BaseException) and id(nested) not in seen:
                seen.add(id(nested))
                lines.append(f"  - {type(nested).__name__}: {nested}"[:300])
                todo.append(nested)
    return "\n".join(lines)


class Contract:
    """The API document, ready to validate exchanges against."""

    def __init__(self, doc: dict[str, Any] | None = None) -> None:
        self.doc = doc if doc is not None else document()
        config = Config(extra_media_type_deserializers={"application/x-ndjson": ndjson_lines})
        self.openapi = OpenAPI.from_dict(self.doc, config=config)
        schemas = {"components": self.doc.get("components", {})}
        self._error_validator = Draft202012Validator(
            {**schemas, "$ref": "#/components/schemas/Error"})
        # literal segments first: /a/b wins over /a/{x}
        self._patterns = [
            (t, re.compile(re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(t))))
            for t in sorted(self.doc["paths"], key=lambda t: (t.count("{"), t))]

    # ---- lookups ----------------------------------------------------------------------

    def operations(self) -> set[tuple[str, str]]:
        """(METHOD, path template) of every operation in the document."""
        methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
        return {(m.upper(), path) for path, item in self.doc["paths"].items()
                for m in item if m in methods}

    def operation(self, method: str, path: str) -> dict[str, Any] | None:
        return self.doc["paths"].get(path, {}).get(method.lower())

    # ---- validation -------------------------------------------------------------------

    def check_request(self, request: httpx.Request) -> None:
        """Raise `ContractViolation` unless the request is one the document allows."""
        if request.method == "HEAD" and self._head_falls_back(request):
            request = httpx.Request("GET", request.url, headers=request.headers)
        try:
            self.openapi.validate_request(_Request(request))
        except OpenAPIError as exc:
            raise ContractViolation(
                f"request {request.method} {request.url} is outside the API document:\n"
                + _describe(exc)) from None

    def check_response(self, request: httpx.Request, response: httpx.Response) -> None:
        """Raise `ContractViolation` unless the response is one the document allows for
        the request (whether or not the request itself was valid)."""
        where = f"{request.method} {request.url.raw_path.decode()} -> {response.status_code}"
        if "sprite-version" not in response.headers:
            raise ContractViolation(f"{where}: no Sprite-Version header")
        if response.status_code == 401:
            self._check_error(where, response, 401, body=request.method != "HEAD")
            return
        if request.method == "HEAD" and self._head_falls_back(request):
            self._check_head(where, request, response)
            return
        try:
            self.openapi.validate_response(_Request(request), _Response(response))
        except PathNotFound:
            self._check_error(where, response, 404)
        except OperationNotFound:
            self._check_error(where, response, 405)
        except OpenAPIError as exc:
            raise ContractViolation(
                f"response {where} is outside the API document:\n{_describe(exc)}\n"
                f"body: {response.content[:500]!r}") from None

    def _head_falls_back(self, request: httpx.Request) -> bool:
        """HEAD on a path whose HEAD is not documented: Starlette answers it as its GET."""
        template = self._template(request)
        item = self.doc["paths"].get(template or "", {})
        return "head" not in item and "get" in item

    def _template(self, request: httpx.Request) -> str | None:
        """The document's path template that the request's raw path matches, if any."""
        path = _Request(request).path
        for template, pattern in self._patterns:
            if pattern.fullmatch(path):
                return template
        return None

    def _check_head(self, where: str, request: httpx.Request, response: httpx.Response) -> None:
        template = self._template(request)
        op = self.operation("GET", template or "") or {}
        if str(response.status_code) not in op.get("responses", {}):
            raise ContractViolation(f"{where}: status not documented for GET {template}")
        if response.content:
            raise ContractViolation(f"{where}: HEAD answered with a body")

    def _check_error(self, where: str, response: httpx.Response, status: int,
                     body: bool = True) -> None:
        if response.status_code != status:
            raise ContractViolation(f"{where}: expected {status} here")
        if not body:  # a HEAD: headers only
            return
        if not response.headers.get("content-type", "").startswith("application/json"):
            raise ContractViolation(f"{where}: error body is not JSON")
        try:
            value = response.json()
        except ValueError:
            raise ContractViolation(f"{where}: error body is not JSON") from None
        problems = [e.message for e in self._error_validator.iter_errors(value)]
        if problems:
            raise ContractViolation(f"{where}: error body {value!r}: {problems}")


@functools.cache
def contract() -> Contract:
    """The process's one `Contract` (building it takes a while)."""
    return Contract()
