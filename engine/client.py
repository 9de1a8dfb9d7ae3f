"""The one asyncio ↔ engine-thread boundary: a queue into the engine, a queue per request out.

The engine core runs in its own daemon thread, stepping while any request waits or runs and
blocking on its inbox when idle. The asyncio side submits requests and receives each request's
``RequestOutput`` deltas on an ``asyncio.Queue`` fed with ``call_soon_threadsafe``. A client that
goes away (a closed stream) aborts its request, which frees its KV slot at the next step.
An exception inside a step finishes every live request with ``error`` (and tells those the
failed step had already finished) and the engine goes on serving; it never takes the thread down.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from engine.loop import EngineCore
from engine.request import EngineRequest, RequestOutput

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Runs an :class:`EngineCore` in a thread and streams outputs to asyncio callers.

    Args:
        core: the engine core (already loaded).
        metrics: an object with ``observe_step(stats)`` (``engine.metrics.EngineMetrics``), or None.
    """

    def __init__(self, core: EngineCore, metrics=None):
        self.core = core
        self.metrics = metrics
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._added: set[str] = set()  # in the engine and not yet finished (engine thread only)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stopping = False

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step (seconds to wait for it)."""
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    @property
    def model_name(self) -> str:
        """The name the API serves the model under."""
        return self.core.model_name

    @property
    def model_path(self) -> str:
        """The checkpoint folder."""
        return self.core.config.model

    @property
    def max_model_len(self) -> int:
        """Prompt plus completion limit (tokens)."""
        return self.core.max_model_len

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (the checkpoint's tokenizer, its special tokens added)."""
        return self.core.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (special tokens skipped)."""
        return self.core.tokenizer.decode(token_ids, skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]:
        """The prompt tokens of a conversation, through the checkpoint's chat template.

        Raises:
            engine.request.InvalidRequestError: the checkpoint has no chat template, or the
                template refuses the messages (``param`` is ``messages``).
        """
        return self.core.apply_chat_template(messages, add_generation_prompt)

    @property
    def default_sampling(self) -> dict:
        """Sampling defaults from the checkpoint's generation config (``temperature``,
        ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` where it sets them)."""
        return self.core.default_sampling

    def validate_request(self, request: EngineRequest) -> None:
        """Check a request against the model's limits before submitting it (no engine state is
        touched, so this is safe from the asyncio thread).

        Raises:
            engine.request.InvalidRequestError: see ``EngineCore.validate_request``.
        """
        self.core.validate_request(request)

    @property
    def is_healthy(self) -> bool:
        """Whether the engine thread is alive."""
        return self._thread.is_alive() and not self._stopping

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until the finished one.

        Raises:
            ValueError: the engine refused the request (its message says why).
            RuntimeError: the engine is not running.
        """
        if not self.is_healthy:
            raise RuntimeError("the engine is not running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._inbox.put(("abort", request.request_id))

    def _deliver(self, request_id: str, item) -> None:
        if isinstance(item, Exception) or item.finished:
            self._added.discard(request_id)
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the caller's event loop has closed: nobody is listening
                self._streams.pop(request_id, None)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "stop":
                return
            if kind == "add":
                try:
                    self.core.add_request(payload)
                    self._added.add(payload.request_id)
                except Exception as exc:  # InvalidRequestError, or anything unexpected
                    self._deliver(payload.request_id, exc)
            elif kind == "abort":
                self._added.discard(payload)
                if self.core.abort_request(payload) is not None:
                    self._observe(self.core.queue_stats())

    def _observe(self, stats) -> None:
        if self.metrics is not None:
            self.metrics.observe_step(stats)

    def _step(self) -> None:
        try:
            outputs, stats = self.core.step()
        except Exception as exc:  # a bug or a device error: fail the live requests, go on
            logger.exception("engine step failed")
            message = f"internal engine error: {exc}"
            # Requests the failed step had already finished lost their last output with it.
            orphans = [r for r in self._added if not self.core.is_live(r)]
            outputs, stats = self.core.fail_all(message), self.core.queue_stats()
            for request_id in orphans:
                self._deliver(request_id, RuntimeError(message))
        self._observe(stats)  # before delivering, so a finished request is already counted
        for out in outputs:
            self._deliver(out.request_id, out)

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drain_inbox(block=not self.core.has_work())
                if not self._stopping and self.core.has_work():
                    self._step()
            except Exception as exc:  # never let the thread die with requests waiting on it
                logger.exception("engine loop error")
                self._fail_everything(f"internal engine error: {exc}")

    def _fail_everything(self, message: str) -> None:
        """Last resort: finish every live sequence (so the loop cannot spin on them) and wake
        every waiting caller with the error."""
        try:
            self.core.fail_all(message)
        except Exception:  # the core itself is broken; the callers still get their error below
            logger.exception("could not fail the live requests")
        for request_id in list(self._streams):
            self._deliver(request_id, RuntimeError(message))
