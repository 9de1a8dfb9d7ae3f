"""The FastAPI application: routes, OpenAI-shaped errors, API keys, the body-size limit, the
OpenAPI document, and the engine's life cycle."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import package_version
from server.auth import APIKeyAuth
from server.body_scan import BodyScanner
from server.errors import install_error_handlers
from server.limits import BodySizeLimit
from server.openapi import install_openapi
from server.routes import dev_router, router

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 2**20
"""Bodies larger than this get a 413 before they are read (bytes)."""


DESCRIPTION = ("OpenAI-compatible completions and chat with batched LayerSkip self-speculative "
               "decoding, vLLM's extras and tokenizer endpoints, health and Prometheus metrics.")


def build_app(engine, metrics, max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
              api_keys: tuple[str, ...] = (), protect_metrics: bool = False,
              server_dev_mode: bool = False) -> FastAPI:
    """Build the app around an engine client (``engine.client.MPEngineClient`` or
    ``AsyncEngine``) and its ``engine.metrics.EngineMetrics``.

    The engine client and the worker process that parses large bodies
    (:class:`server.body_scan.BodyScanner`) start with the app's lifespan and stop with it. ``app.state.draining``
    turns true when shutdown begins; new completions then get 503 and ``/health`` says so.

    Args:
        max_request_body_bytes: the largest request body accepted (bytes); larger ones get 413.
        api_keys: with any, ``/v1/*`` and the tokenizer endpoints need one as a bearer token
            (:mod:`server.auth`); empty strings are ignored.
        protect_metrics: with API keys, ``/metrics`` needs one too.
        server_dev_mode: also serve the development endpoints (``POST /reset_prefix_cache``).
    """

    scanner = BodyScanner()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scanner.start()
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            scanner.shutdown()

    app = FastAPI(title="LayerSkip self-speculative inference server", version=package_version(),
                  description=DESCRIPTION, lifespan=lifespan)
    app.state.engine = engine
    app.state.body_scanner = scanner
    app.state.metrics = metrics
    app.state.draining = False
    install_error_handlers(app)
    app.include_router(router)
    if server_dev_mode:
        app.include_router(dev_router)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_body_bytes)
    keys = tuple(k for k in api_keys if k)
    if keys:  # outermost: a request without a key gets its 401 before its body is read
        app.add_middleware(APIKeyAuth, api_keys=keys, protect_metrics=protect_metrics)
    install_openapi(app, bool(keys), protect_metrics)
    return app
