"""The one API ↔ engine boundary: requests in, each request's ``RequestOutput`` deltas out.

Two transports with one interface (vLLM v1's ``EngineCoreClient`` has the same pair):

- :class:`MPEngineClient`, what ``layerskip-serve`` runs: the engine core in its own process
  (:mod:`engine.core_proc`), so HTTP work in the API process never holds the engine's GIL.
  Requests go over a pipe from a sender thread; every step's outputs come back in one message,
  read on the event loop (``loop.add_reader``) and put on the requests' ``asyncio.Queue``\\s.
  When the engine process dies, every in-flight request ends with an error at once, the client
  turns unhealthy, and ``on_engine_death`` is called (the CLI then exits non-zero).
- :class:`AsyncEngine`: the same core in a thread of the calling process, for the tests and
  for embedding the server in one process.

Both answer the API side's questions (tokenizer, limits, request checks) from the
:class:`~engine.processor.EngineInfo` the core hands over, without touching engine state. A
caller that goes away (a closed stream) aborts its request, which frees its KV slot at the next
step.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable

from engine.config import EngineConfig
from engine.core_proc import EngineLoop, WireError, run_engine_core
from engine.detokenizer import IncrementalDetokenizer, decode_whole_characters
from engine.processor import EngineInfo, apply_chat_template, check_request
from engine.request import EngineRequest, InvalidRequestError, RequestOutput

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine is not running (stopped, or its process died): the API answers 503."""


class EngineOverloadedError(RuntimeError):
    """Too many sequences wait already: the API answers 503 with ``Retry-After``.

    Attributes:
        retry_after: seconds after which a retry may be admitted (the ``Retry-After`` header).
    """

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


RETRY_AFTER_SECONDS = 1
"""The ``Retry-After`` of an overload refusal (seconds): a slot frees within a few decoding
steps, so a prompt retry is likely to be admitted."""


class _EngineClient:
    """What both transports share: the API side's view of the model, the streams, and the count
    of outstanding sequences that bounds the waiting queue without a round trip to the engine."""

    info: EngineInfo
    metrics = None

    def __init__(self):
        self._streams: dict[str, asyncio.Queue] = {}
        self._outstanding: set[str] = set()  # reserved request ids, until their stream ends

    @property
    def model_name(self) -> str:
        """The name the API serves the model under."""
        return self.info.model_name

    @property
    def model_path(self) -> str:
        """The checkpoint folder."""
        return self.info.model_path

    @property
    def max_model_len(self) -> int:
        """Prompt plus completion limit (tokens)."""
        return self.info.max_model_len

    @property
    def max_prompt_chars(self) -> int:
        """Longer texts cannot fit in ``max_model_len`` tokens (characters); refuse them untokenized."""
        return self.info.max_model_len * self.info.max_token_chars

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (the checkpoint's tokenizer; its special tokens, such as BOS,
        added unless ``add_special_tokens`` is false)."""
        return self.info.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids`` (special tokens skipped unless ``skip_special_tokens`` is
        false)."""
        return self.info.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens,
                                          clean_up_tokenization_spaces=False)

    def token_strs(self, token_ids: list[int]) -> list[str]:
        """Each token's vocabulary entry (``convert_ids_to_tokens``; byte-level BPE spells a space
        ``Ġ``)."""
        return [str(t) for t in self.info.tokenizer.convert_ids_to_tokens(token_ids)]

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table (token ids must be below it)."""
        return self.info.vocab_size

    def decode_prompt(self, token_ids: list[int]) -> str:
        """The ``echo`` of a token-id prompt: its text, less the U+FFFD of a character its last
        token ends inside (that character opens the completion's text instead; see
        :mod:`engine.detokenizer`)."""
        return decode_whole_characters(self.info.tokenizer, token_ids)

    def detokenizer(self, prompt_token_ids: list[int]) -> IncrementalDetokenizer:
        """An incremental detokenizer on the API side's tokenizer, with ``prompt_token_ids`` as
        its context (empty: from the start): per-token texts that concatenate to the text."""
        return IncrementalDetokenizer(self.info.tokenizer, prompt_token_ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            add_special_tokens: bool = False) -> list[int]:
        """The prompt tokens of a conversation, through the checkpoint's chat template (the
        template writes the special tokens; ``add_special_tokens`` adds the tokenizer's too).

        Raises:
            engine.request.InvalidRequestError: the checkpoint has no chat template, or the
                template refuses the messages (``param`` is ``messages``).
        """
        return apply_chat_template(self.info.tokenizer, messages, add_generation_prompt,
                                   add_special_tokens)

    @property
    def default_sampling(self) -> dict:
        """Sampling defaults from the checkpoint's generation config (``temperature``,
        ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` where it sets them)."""
        return self.info.default_sampling

    def validate_request(self, request: EngineRequest) -> None:
        """Check a request against the model's limits before submitting it (the engine's own
        checks, :func:`engine.processor.check_request`; no engine state is touched).

        Raises:
            engine.request.InvalidRequestError: a value out of range, naming the parameter.
        """
        info = self.info
        check_request(request, info.vocab_size, info.max_model_len, info.num_layers)

    @property
    def num_outstanding(self) -> int:
        """Sequences reserved with :meth:`reserve` whose streams have not ended (running in the
        engine, waiting there, or on their way)."""
        return len(self._outstanding)

    def check_capacity(self, num_seqs: int) -> None:
        """Whether ``num_seqs`` more sequences may queue now (the cheap check before tokenizing).

        The engine runs ``max_num_seqs`` sequences; beyond them at most ``max_waiting_requests``
        may wait, counted here on the API side from the requests this client has outstanding,
        so an overload is answered without asking the engine process.

        Raises:
            EngineOverloadedError: the queue would pass its bound (retry later).
            engine.request.InvalidRequestError: ``num_seqs`` alone is more than the engine ever
                queues (a retry cannot help; ``param`` is ``prompt``).
        """
        bound = self.info.max_waiting_requests
        if bound is None:
            return
        capacity = self.info.max_num_seqs + bound
        if num_seqs > capacity:
            raise InvalidRequestError(
                f"this request brings {num_seqs} sequences (prompts x n), more than the server "
                f"ever queues ({self.info.max_num_seqs} running + {bound} waiting, "
                "--max-num-seqs + --max-waiting-requests); split it", "prompt")
        if len(self._outstanding) + num_seqs > capacity:
            waiting = max(0, len(self._outstanding) - self.info.max_num_seqs)
            raise EngineOverloadedError(
                f"the server is overloaded: {waiting} sequences wait already "
                f"(--max-waiting-requests {bound}); retry in {RETRY_AFTER_SECONDS} s",
                RETRY_AFTER_SECONDS)

    def reserve(self, request_ids: list[str]) -> None:
        """:meth:`check_capacity` for these requests, then count them as outstanding until
        their :meth:`generate` streams end (or are collected unstarted). Call it on the event
        loop, right before :meth:`generate`, with no ``await`` between the two.

        Raises:
            EngineOverloadedError, engine.request.InvalidRequestError: see :meth:`check_capacity`.
        """
        self.check_capacity(len(request_ids))
        self._outstanding.update(request_ids)

    def _release(self, request_id: str) -> None:
        self._outstanding.discard(request_id)

    @property
    def is_healthy(self) -> bool:
        raise NotImplementedError

    def _submit(self, request: EngineRequest) -> None:
        raise NotImplementedError

    def _abort(self, request_id: str) -> None:
        raise NotImplementedError

    def reset_prefix_cache(self) -> None:
        """Have the engine forget its cached prompt blocks no running request holds
        (:meth:`EngineCore.reset_prefix_cache <engine.loop.EngineCore.reset_prefix_cache>`); it
        does so before any request submitted after this call."""
        raise NotImplementedError

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until the finished one. Its :meth:`reserve`
        count is released when the stream ends, or when it is collected without having run.

        Raises (while iterating):
            engine.request.InvalidRequestError: the engine refused the request.
            EngineDeadError: the engine is not running, or stopped while the request ran.
            RuntimeError: a step failed after finishing this request.
        """
        stream = self._generate(request)
        weakref.finalize(stream, self._release, request.request_id)
        return stream

    async def _generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        try:
            if not self.is_healthy:
                raise EngineDeadError("the engine is not running")
            stream: asyncio.Queue = asyncio.Queue()
            self._streams[request.request_id] = stream
            self._submit(request)
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
                    self._abort(request.request_id)
        finally:
            self._release(request.request_id)

    def fail_streams(self, exc_factory: Callable[[], Exception]) -> int:
        """End every open stream now with ``exc_factory()`` and abort its engine request
        (shutdown past its grace time, or a dead engine); returns how many there were."""
        ids = list(self._streams)
        for request_id in ids:
            self._put(request_id, exc_factory())
            self._abort(request_id)
        return len(ids)

    def _put(self, request_id: str, item) -> None:
        """Hand ``item`` to the request's stream (on the event loop's thread)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item.to_exception() if isinstance(item, WireError) else item)

    def _observe(self, stats: list) -> None:
        if self.metrics is not None:
            for one in stats:
                self.metrics.observe_step(one)


class MPEngineClient(_EngineClient):
    """The engine core in its own process (vLLM v1's ``EngineCoreProc`` behind
    ``AsyncMPClient``).

    Args:
        config: the engine configuration.
        cpu_threads: torch intra-op threads of the engine process.
        metrics: an object with ``observe_step(stats)`` (``engine.metrics.EngineMetrics``), or None;
            fed on the event loop from each step's message.
        log_level: the engine process's logging level name.

    :meth:`load` starts the process and waits for the model (raises ``ValueError`` with the
    engine's message when it cannot load); :meth:`start`, on the event loop, begins reading its
    outputs.
    """

    def __init__(self, config: EngineConfig, cpu_threads: int, metrics=None,
                 log_level: str = "INFO"):
        super().__init__()
        self.config, self.cpu_threads, self.metrics = config, cpu_threads, metrics
        self.log_level = log_level
        self.on_engine_death: Callable[[], None] | None = None
        self.dead = False
        self._stopping = False
        self._proc = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="engine-sender", daemon=True)

    def load(self, timeout: float | None = None) -> EngineInfo:
        """Start the engine process and wait until it has loaded the model (seconds; None waits
        as long as it takes).

        Raises:
            ValueError: the engine could not load the model (its message says why).
            RuntimeError: the engine process died or did not answer in time.
        """
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        parent, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=run_engine_core, name="layerskip-engine-core",
                                 args=(self.config, child, self.cpu_threads, self.log_level),
                                 daemon=True)
        self._proc.start()
        child.close()  # so the engine's death reads as end-of-file here
        self._conn = parent
        if timeout is not None and not parent.poll(timeout):
            self._kill()
            raise RuntimeError(f"the engine process did not load the model in {timeout:.0f} s")
        try:
            kind, payload = parent.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            raise RuntimeError(f"the engine process died while loading the model "
                               f"(exit code {self._proc.exitcode})") from None
        if kind == "failed":
            self._proc.join(5)
            raise ValueError(payload)
        self.info = payload
        self._sender.start()
        return payload

    @property
    def pid(self) -> int | None:
        """The engine process's id (None before :meth:`load`)."""
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Begin delivering outputs on the running event loop."""
        self._loop = asyncio.get_running_loop()
        fd = self._conn.fileno()
        self._loop.add_reader(fd, self._on_readable)
        # uvloop's add_reader turns the descriptor non-blocking. The sender thread writes on
        # the same duplex pipe: a non-blocking write into a full pipe raises, and a message
        # would be lost (a burst of 2 000 requests lost ~900 of them), or cut in two mid-write.
        # A read would likewise fail on a message only partly written. The loop only needs
        # readiness from the descriptor, so it goes back to blocking.
        os.set_blocking(fd, True)

    @property
    def is_healthy(self) -> bool:
        """Whether the engine process is alive and not stopping."""
        return (not self.dead and not self._stopping and self._proc is not None
                and self._proc.is_alive())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process after its current step (seconds to wait before killing it)."""
        self._stopping = True
        if self._loop is not None and self._conn is not None:
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (ValueError, OSError, RuntimeError):
                pass
        self._outbox.put(("stop", None))
        if self._proc is not None:
            self._proc.join(timeout)
            self._kill()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(2)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)

    def _submit(self, request: EngineRequest) -> None:
        self._outbox.put(("add", request))

    def _abort(self, request_id: str) -> None:
        self._outbox.put(("abort", request_id))

    def reset_prefix_cache(self) -> None:
        self._outbox.put(("reset_prefix_cache", None))

    def _send_loop(self) -> None:
        """Pickling and writing happen here, so a full pipe never blocks the event loop."""
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except (OSError, EOFError):  # the engine is gone; its reader reports it
                pass
            except Exception as exc:  # this message cannot be sent (pickling): fail its request
                logger.exception("could not send %r to the engine", message[0])
                if message[0] == "add" and self._loop is not None:
                    error = WireError("error", f"internal error: the request could not be "
                                               f"sent to the engine ({type(exc).__name__})")
                    try:
                        self._loop.call_soon_threadsafe(self._put, message[1].request_id, error)
                    except RuntimeError:  # the event loop has closed: nobody is listening
                        pass
            if message[0] == "stop":
                return

    def _on_readable(self) -> None:
        """Read every message the engine has sent (one per step) and deliver it."""
        fd = self._conn.fileno()
        if not os.get_blocking(fd):
            # uvloop's add_reader makes the pipe non-blocking; a step message larger than the
            # socket buffer (echo with logprobs of a long prompt) would then fail half-read, and
            # the sender thread's writes of a large request could fail too. poll() said a message
            # has begun, so a blocking read only waits for the rest of it.
            os.set_blocking(fd, True)
        try:
            while self._conn.poll():
                kind, deliveries, stats = self._conn.recv()
                self._observe(stats)  # before delivering, so a finished request is already counted
                for request_id, item in deliveries:
                    self._put(request_id, item)
        except (EOFError, OSError):
            self._on_engine_death()

    def _on_engine_death(self) -> None:
        self._loop.remove_reader(self._conn.fileno())
        if self._stopping:
            return
        self.dead = True
        self._proc.join(1)
        code = self._proc.exitcode
        message = f"the engine process died (exit code {code}); the server is restarting"
        logger.error("%s; failing %d in-flight requests", message, len(self._streams))
        self.fail_streams(lambda: EngineDeadError(message))
        if self.on_engine_death is not None:
            self.on_engine_death()


class AsyncEngine(_EngineClient):
    """Runs an :class:`~engine.loop.EngineCore` in a thread of this process and streams outputs
    to asyncio callers (the tests' and embedders' transport).

    Args:
        core: the engine core (already loaded).
        metrics: an object with ``observe_step(stats)`` (``engine.metrics.EngineMetrics``), or None.
    """

    def __init__(self, core, metrics=None):
        super().__init__()
        self.core = core
        self.metrics = metrics
        self.info = core.info()
        self._engine = EngineLoop(core)
        self._inbox: queue.Queue = queue.Queue()
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}
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
    def is_healthy(self) -> bool:
        """Whether the engine thread is alive."""
        return self._thread.is_alive() and not self._stopping

    def _submit(self, request: EngineRequest) -> None:
        self._loops[request.request_id] = asyncio.get_running_loop()
        self._inbox.put(("add", request))

    def _abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def reset_prefix_cache(self) -> None:
        self._inbox.put(("reset_prefix_cache", None))

    def _deliver(self, deliveries, stats) -> None:
        self._observe(stats)
        for request_id, item in deliveries:
            if isinstance(item, WireError) or item.finished:
                loop = self._loops.pop(request_id, None)
            else:
                loop = self._loops.get(request_id)
            if loop is None:
                continue
            try:
                loop.call_soon_threadsafe(self._put, request_id, item)
            except RuntimeError:  # the caller's event loop has closed: nobody is listening
                self._loops.pop(request_id, None)

    def _run(self) -> None:
        engine, core = self._engine, self.core
        while not self._stopping:
            try:
                deliveries, stats = [], []
                block = not core.has_work()
                while True:
                    try:
                        kind, payload = self._inbox.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if kind == "stop":
                        return
                    if kind == "add":
                        deliveries += engine.add(payload)
                    elif kind == "reset_prefix_cache":
                        core.reset_prefix_cache()
                    else:
                        self._loops.pop(payload, None)
                        if (aborted := engine.abort(payload)) is not None:
                            stats.append(aborted)
                if core.has_work():
                    step_deliveries, step_stats = engine.step()
                    deliveries += step_deliveries
                    stats.append(step_stats)
                self._deliver(deliveries, stats)
            except Exception as exc:  # never let the thread die with requests waiting on it
                logger.exception("engine loop error")
                self._deliver(engine.fail_everything(f"internal engine error: {exc}"), [])

