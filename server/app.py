"""The FastAPI application: routes, OpenAI-shaped errors, the body-size limit, and the engine's
life cycle."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.errors import install_error_handlers
from server.limits import BodySizeLimit
from server.routes import router

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 2**20
"""Bodies larger than this get a 413 before they are read (bytes)."""


def build_app(engine, metrics, max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
              ) -> FastAPI:
    """Build the app around an engine client (``engine.client.MPEngineClient`` or
    ``AsyncEngine``) and its ``engine.metrics.EngineMetrics``.

    The engine client starts with the app's lifespan and stops with it. ``app.state.draining``
    turns true when shutdown begins; new completions then get 503 and ``/health`` says so.

    Args:
        max_request_body_bytes: the largest request body accepted (bytes); larger ones get 413.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="LayerSkip self-speculative inference server", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.draining = False
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_body_bytes)
    return app
