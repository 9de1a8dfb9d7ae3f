"""The OpenAPI document as the server really answers: FastAPI's, corrected in three ways.

- FastAPI documents a 422 on every route with a body; this server answers validation errors with
  a 400 in the OpenAI error shape (``server.errors``), which the routes declare themselves, so
  the 422s and their schemas are dropped.
- With API keys, the protected operations (``server.auth.is_protected``) get the bearer security
  scheme and a 401 response.
- The error responses all refer to one ``ErrorResponse`` schema.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.auth import is_protected

ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}
UNUSED_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI, with_api_keys: bool, protect_metrics: bool) -> None:
    """Make ``app.openapi()`` build (once) the corrected document described above."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            _drop_validation_errors(schema)
            if with_api_keys:
                _add_bearer_auth(schema, protect_metrics)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _operations(schema: dict):
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            yield path, method, operation


def _drop_validation_errors(schema: dict) -> None:
    for _, _, operation in _operations(schema):
        operation.get("responses", {}).pop("422", None)
    schemas = schema.get("components", {}).get("schemas", {})
    for name in UNUSED_SCHEMAS:
        schemas.pop(name, None)


def _add_bearer_auth(schema: dict, protect_metrics: bool) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer",
        "description": "one of the server's --api-key values"}
    for path, _, operation in _operations(schema):
        if is_protected(path, protect_metrics):
            operation["security"] = [{"bearer": []}]
            operation.setdefault("responses", {})["401"] = {
                "description": "missing or wrong API key",
                "content": {"application/json": {"schema": ERROR_SCHEMA}}}
