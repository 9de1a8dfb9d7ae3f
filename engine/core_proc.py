"""The engine core's own process, as in vLLM v1 (``EngineCoreProc``): model, scheduler, step loop.

The API process (``engine.client.MPEngineClient``) starts :func:`run_engine_core` with the
``spawn`` method and talks to it over one duplex ``multiprocessing`` pipe of pickled tuples:

- API → engine: ``("add", EngineRequest)``, ``("abort", request_id)``,
  ``("reset_prefix_cache", None)``, ``("stop", None)``.
- engine → API: first ``("ready", EngineInfo)`` or ``("failed", message)``; then one
  ``("step", deliveries, [StepStats, ...])`` message per step that has outputs to hand over (or
  per inbox batch that finished something), where ``deliveries`` is a list of ``(request_id,
  RequestOutput | WireError)``: every output of the step in one message, never one message per
  request per token. A ``FINAL_ONLY`` request's outputs (a non-streamed response) are held back
  and go out merged into one with its last one; steps with nothing to hand over send their
  statistics at most every :data:`STATS_INTERVAL` seconds (and when the engine goes idle), so a
  batch of non-streamed requests costs one message per finished request plus at most ten a
  second, not one per step.

The engine process never waits for the API process's GIL: it blocks on the pipe only while it has
no work or while a message larger than the pipe's buffer is being read (a long non-streamed
response with logprobs), and otherwise polls it (a few microseconds) once per step. It dies with
its parent: the kernel sends it SIGKILL when the parent goes (``PR_SET_PDEATHSIG`` on Linux), and
an end-of-file on the pipe ends its loop. It ignores SIGINT and SIGTERM (a terminal's Ctrl-C,
``timeout`` or systemd signal the whole process group; the API process drains first, then tells
the engine to stop).

:class:`EngineLoop` holds the bookkeeping both transports share (the in-process thread of
``engine.client.AsyncEngine`` uses it too): which requests were added and not yet finished, and
what to tell them when a step fails.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.request import RequestOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WireError:
    """An exception that ends one request, in a form that pickles: ``kind`` is ``invalid`` (an
    ``InvalidRequestError``, ``param`` naming the field) or ``error`` (anything else)."""

    kind: str
    message: str
    param: str | None = None

    @staticmethod
    def of(exc: Exception) -> "WireError":
        """The wire form of ``exc``."""
        from engine.request import InvalidRequestError

        if isinstance(exc, InvalidRequestError):
            return WireError("invalid", str(exc), exc.param)
        return WireError("error", str(exc))

    def to_exception(self) -> Exception:
        """The exception the API side raises to the request's caller."""
        from engine.request import InvalidRequestError

        if self.kind == "invalid":
            return InvalidRequestError(self.message, self.param or "prompt")
        return RuntimeError(self.message)


class EngineLoop:
    """One engine core driven by messages: add, abort, step (transport-independent).

    Each method returns the ``(request_id, RequestOutput | WireError)`` deliveries due now; the
    caller sends them on. A ``FINAL_ONLY`` request's outputs are due only with its last one,
    merged into one output (its error instead, if it fails: an error ends the response). An
    exception inside a step finishes every live request with ``error`` (and tells the requests
    the failed step had already finished) and the loop goes on serving: a bug in one step never
    takes the engine down.
    """

    def __init__(self, core):
        self.core = core
        self.added: set[str] = set()  # in the core and not yet finished
        self.held: dict[str, list] = {}  # FINAL_ONLY requests' outputs so far

    def add(self, request) -> list:
        """Queue ``request`` (an ``EngineRequest``); a refusal is delivered as a ``WireError``."""
        from engine.request import RequestOutputKind

        try:
            self.core.add_request(request)
        except Exception as exc:  # InvalidRequestError, or anything unexpected
            return [(request.request_id, WireError.of(exc))]
        self.added.add(request.request_id)
        if request.output_kind is RequestOutputKind.FINAL_ONLY:
            self.held[request.request_id] = []
        return []

    def abort(self, request_id: str):
        """Abort a live request (its caller has gone); returns the queue stats when it was live."""
        self.added.discard(request_id)
        self.held.pop(request_id, None)
        if self.core.abort_request(request_id) is not None:
            return self.core.queue_stats()
        return None

    def step(self):
        """Run one step; returns ``(deliveries, stats)``."""
        try:
            outputs, stats = self.core.step()
        except Exception as exc:  # a bug or a device error: fail the live requests, go on
            logger.exception("engine step failed")
            message = f"internal engine error: {exc}"
            # Requests the failed step had already finished lost their last output with it.
            orphans = [r for r in self.added if not self.core.is_live(r)]
            outputs, stats = self.core.fail_all(message), self.core.queue_stats()
            deliveries = [(r, WireError("error", message)) for r in orphans]
        else:
            deliveries = []
        deliveries.extend((out.request_id, out) for out in outputs)
        for request_id, item in deliveries:
            if isinstance(item, WireError) or item.finished:
                self.added.discard(request_id)
        return self._hold(deliveries), stats

    def _hold(self, deliveries: list) -> list:
        """Keep back a ``FINAL_ONLY`` request's outputs until its last one, then deliver them
        merged into one (:meth:`RequestOutput.merge <engine.request.RequestOutput.merge>`: one
        object to pickle and read, however long the response), or drop them for its error;
        other requests' outputs pass through."""
        out = []
        for request_id, item in deliveries:
            held = self.held.get(request_id)
            if held is None:
                out.append((request_id, item))
            elif isinstance(item, WireError):
                del self.held[request_id]
                out.append((request_id, item))
            elif item.finished:
                del self.held[request_id]
                out.append((request_id, RequestOutput.merge(held + [item])))
            else:
                held.append(item)
        return out

    def fail_everything(self, message: str) -> list:
        """Last resort after an error outside a step: finish every live sequence (so the loop
        cannot spin on them) and tell every added request."""
        try:
            self.core.fail_all(message)
        except Exception:  # the core itself is broken; the callers still get their error below
            logger.exception("could not fail the live requests")
        deliveries = [(r, WireError("error", message)) for r in self.added]
        self.added.clear()
        self.held.clear()
        return deliveries


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no orphan engine, ever)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def set_cpu_threads(num_threads: int) -> None:
    """Set torch's intra-op threads (and OpenMP's) for this process; call before torch is used."""
    os.environ["OMP_NUM_THREADS"] = str(num_threads)
    import torch

    torch.set_num_threads(num_threads)


def run_engine_core(config: EngineConfig, conn, cpu_threads: int, log_level: str = "INFO") -> None:
    """The engine process's main: load the model, then serve the pipe until told to stop.

    Args:
        config: what to load and how to run it.
        conn: this process's end of the duplex pipe (see the module docstring).
        cpu_threads: torch intra-op threads for this process.
        log_level: the logging level name.
    """
    _die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the API process decides when the engine stops
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    set_cpu_threads(cpu_threads)
    from engine.loop import EngineCore

    try:
        core = EngineCore(config)
    except Exception as exc:  # CheckpointError, ValueError, a device error: the API names it
        conn.send(("failed", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"))
        return
    if os.getppid() != parent:  # the parent died while the model loaded
        return
    conn.send(("ready", core.info()))
    try:
        _serve(EngineLoop(core), conn)
    except (EOFError, OSError, BrokenPipeError):  # the API process is gone: nobody to serve
        pass


STATS_INTERVAL = 0.1
"""Seconds a step's statistics may wait for a message that carries outputs (so /metrics lags the
engine by at most this much plus one step while only ``FINAL_ONLY`` requests run; they are
also sent whenever the engine goes idle)."""


def _serve(loop: EngineLoop, conn) -> None:
    core = loop.core
    stats: list = []  # not yet sent
    sent = time.monotonic()
    while True:
        deliveries = []
        block = not core.has_work()
        while block or conn.poll():
            kind, payload = conn.recv()
            block = False
            if kind == "stop":
                return
            if kind == "add":
                deliveries += loop.add(payload)
            elif kind == "abort" and (aborted := loop.abort(payload)) is not None:
                stats.append(aborted)
            elif kind == "reset_prefix_cache":
                core.reset_prefix_cache()
        if core.has_work():
            try:
                step_deliveries, step_stats = loop.step()
                stats.append(step_stats)
            except Exception as exc:  # never let the loop die with requests waiting on it
                logger.exception("engine loop error")
                step_deliveries = loop.fail_everything(f"internal engine error: {exc}")
                try:  # the gauges: nothing is running any more
                    stats.append(core.queue_stats())
                except Exception:  # the core itself is broken
                    logger.exception("could not read the queue stats")
            deliveries += step_deliveries
        # Each message wakes the API process, a cost this process pays in the write: send
        # one when there are outputs to hand over, else only every STATS_INTERVAL (or when idle).
        now = time.monotonic()
        if deliveries or (stats and (now - sent >= STATS_INTERVAL or not core.has_work())):
            conn.send(("step", deliveries, stats))
            stats, sent = [], now
