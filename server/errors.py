"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Caller mistakes are 4xx (validation 400, unknown model 404); only the server's own faults are 5xx.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so a message that quotes client text (even a lone
    surrogate) always encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error answered in the OpenAI shape.

    Args:
        status: the HTTP status (4xx for caller mistakes).
        message: what went wrong, for a person.
        param: the request field at fault, if one is.
        code: a machine-readable code (e.g. ``model_not_found``).
        type: the OpenAI error type.
        headers: extra response headers (``Retry-After`` on a 503 overload).
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code=None) -> dict:
    """The JSON body of an error."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


UNION_TAGS = {"/tokenize": ("prompt", "messages")}
"""Routes whose body is a tagged union: pydantic puts the tag first in an error's location."""


def _validation_message(exc: RequestValidationError, path: str) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if loc and loc[0] in UNION_TAGS.get(path, ()):
        loc = loc[1:]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return f"{where}: {first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    """Answer validation errors, :class:`APIError`, HTTP errors and crashes in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return ErrorJSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status,
                                 headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc, request.url.path)
        return ErrorJSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        # exc.headers carries a 405's Allow (RFC 9110 §15.5.6 requires it)
        return ErrorJSONResponse(error_body(str(exc.detail), "invalid_request_error"),
                                 exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        return ErrorJSONResponse(error_body(f"internal server error: {exc}", "server_error"), 500)
