"""The FastAPI application: routes, OpenAI-shaped errors, and the engine's life cycle."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.errors import install_error_handlers
from server.routes import router


def build_app(engine, metrics) -> FastAPI:
    """Build the app around an ``engine.client.AsyncEngine`` and its ``engine.metrics.EngineMetrics``.

    The engine thread starts with the app's lifespan and stops with it.
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
    install_error_handlers(app)
    app.include_router(router)
    return app
