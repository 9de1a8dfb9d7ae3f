"""uvicorn, with a shutdown that drains: what SIGTERM does, and what a dead engine does.

On SIGTERM (or the first Ctrl-C) the server stops accepting connections, answers new requests on
open connections with 503 and turns ``/health`` to 503, and lets running requests finish for
``grace_seconds``. When that runs out, every open stream gets a final error event and
``data: [DONE]``, and every waiting non-streamed request a 503 body; then the engine stops and the
process exits 0. When the engine process dies, the in-flight requests end with errors at once
and the process exits 1, so that Docker or Kubernetes restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from engine.client import EngineDeadError

logger = logging.getLogger(__name__)

BACKSTOP_SECONDS = 5.0
"""uvicorn's own cut-off comes this long after ours, so the error events have time to go out."""


DEATH_LINGER_SECONDS = 1.0
"""After the engine died, the server answers 503 this long before it exits (seconds)."""


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` for an app from ``server.app.build_app``.

    Args:
        app: the app (its ``state.engine`` is the engine client).
        grace_seconds: how long running requests may go on after SIGTERM (seconds).
        **kwargs: ``uvicorn.Config`` options (host, port, log level).

    ``exit_code`` is 0 after a drain, 1 when the engine died.
    """

    def __init__(self, app, grace_seconds: float, **kwargs):
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=grace_seconds
                                        + BACKSTOP_SECONDS, **kwargs))
        self.app, self.grace_seconds = app, grace_seconds
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        app.state.engine.on_engine_death = self._on_engine_death

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's: it re-raises the signal after shutdown, so a clean drain would still end
        # the process by signal 15 instead of exit status 0.
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        logger.info("received signal %d: draining for up to %.0f s", sig, self.grace_seconds)
        self._begin_drain()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, self.grace_seconds,
                                            self._cut_streams)

    def _begin_drain(self) -> None:
        self.app.state.draining = True
        self.should_exit = True

    def _cut_streams(self) -> None:
        n = self.app.state.engine.fail_streams(
            lambda: EngineDeadError("the server is shutting down "
                                    f"(--timeout-graceful-shutdown={self.grace_seconds:g} s)"))
        if n:
            logger.warning("grace time over: ended %d running requests with an error", n)

    def _on_engine_death(self) -> None:
        # The in-flight requests already have their errors; /health answers 503 for a moment
        # (so a probe sees why) before the server stops.
        self.exit_code = 1
        self.app.state.draining = True
        asyncio.get_running_loop().call_later(DEATH_LINGER_SECONDS, self._begin_drain)
