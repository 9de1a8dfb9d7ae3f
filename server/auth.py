"""Bearer-token authentication, vLLM's ``--api-key``: which paths need a key, and the middleware
that answers 401 before a request's body is read.

``/v1/*``, ``/tokenize``, ``/detokenize`` and the development endpoints need
``Authorization: Bearer <key>`` with one of the configured keys; ``/health``, ``/version``, the
OpenAPI document and (unless ``protect_metrics``) ``/metrics`` stay open, so probes and
Prometheus work without the key. Keys are compared as SHA-256 digests with
:func:`hmac.compare_digest`, against every key, so neither the time taken nor which key matched
depends on how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac

from server.errors import ErrorJSONResponse, error_body

TOKENIZER_PATHS = ("/tokenize", "/detokenize")
DEV_PATHS = ("/reset_prefix_cache",)  # only served with --server-dev-mode


def is_protected(path: str, protect_metrics: bool = False) -> bool:
    """Whether ``path`` needs an API key when the server has any."""
    return (path == "/v1" or path.startswith("/v1/") or path in TOKENIZER_PATHS
            or path in DEV_PATHS or (protect_metrics and path == "/metrics"))


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class APIKeyAuth:
    """ASGI middleware: 401 in the OpenAI error shape, with ``WWW-Authenticate: Bearer``, for a
    protected path (:func:`is_protected`) without a valid bearer token.

    Args:
        app: the ASGI app to guard.
        api_keys: the accepted keys (at least one; empty strings are ignored).
        protect_metrics: ``/metrics`` needs a key too.

    Raises:
        ValueError: no non-empty key.
    """

    def __init__(self, app, api_keys, protect_metrics: bool = False):
        self.app, self.protect_metrics = app, protect_metrics
        self._digests = tuple(_digest(k.encode()) for k in api_keys if k)
        if not self._digests:
            raise ValueError("APIKeyAuth needs at least one non-empty API key")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_protected(scope["path"], self.protect_metrics):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if header is not None and self._valid(header):
            return await self.app(scope, receive, send)
        message = ("Missing API key: send it as 'Authorization: Bearer <key>'" if header is None
                   else "Incorrect API key provided")
        response = ErrorJSONResponse(
            error_body(message, "invalid_request_error", code="invalid_api_key"), 401,
            headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _valid(self, header: bytes) -> bool:
        scheme, _, token = header.strip().partition(b" ")
        given = _digest(token.strip())
        matched = False
        for digest in self._digests:  # every key, whichever matches
            matched |= hmac.compare_digest(given, digest)
        return matched and scheme.lower() == b"bearer"
