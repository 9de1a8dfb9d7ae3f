"""Prometheus metrics: the only module that imports ``prometheus_client``.

The engine hands plain per-step counters (:class:`engine.stats.StepStats`) to
:meth:`EngineMetrics.observe_step`. Names follow vLLM's with our ``layerskip_`` prefix. Derived
figures are best computed in PromQL from the raw counters:

- acceptance rate: ``rate(layerskip_spec_decode_num_accepted_tokens_total[1m])
  / rate(layerskip_spec_decode_num_draft_tokens_total[1m])``
- mean accepted length (tokens per round): ``1 + rate(..._num_accepted_tokens_total[1m])
  / rate(layerskip_spec_decode_num_drafts_total[1m])``
- acceptance at draft position ``i`` (given the drafts before it were accepted):
  ``rate(..._num_accepted_tokens_per_pos_total{position="i"}[1m])
  / rate(..._num_accepted_tokens_per_pos_total{position="i-1"}[1m])`` (``position="0"`` over
  ``rate(layerskip_spec_decode_num_drafts_total[1m])``)
- share of rounds that drafted ``k``: ``sum by (num_speculations)
  (rate(layerskip_spec_decode_rounds_total[5m])) / ignoring(num_speculations) group_left
  sum(rate(layerskip_spec_decode_rounds_total[5m]))``
- tokens/s: ``rate(layerskip_generation_tokens_total[1m])``
- inter-token latency p90: ``histogram_quantile(0.9, sum by (le)
  (rate(layerskip_inter_token_latency_seconds_bucket[1m])))``

- queue time p90: ``histogram_quantile(0.9, sum by (le)
  (rate(layerskip_request_queue_time_seconds_bucket[1m])))``
- prefix cache hit rate: ``rate(layerskip_prefix_cache_hits_total[5m])
  / rate(layerskip_prefix_cache_queries_total[5m])`` (both in tokens, as vLLM's)

- mean prompt length: ``rate(layerskip_request_prompt_tokens_sum[1m])
  / rate(layerskip_request_prompt_tokens_count[1m])``

No ``*_created`` series: ``prometheus_client.disable_created_metrics()`` is called on import (as
vLLM does), so a scrape carries only the samples dashboards read.

Two gauges give the same over the last ``window_seconds`` for dashboards without PromQL:
``layerskip_spec_decode_acceptance_rate`` (accepted / drafted tokens, the bonus token never
counted, so always in [0, 1]) and ``layerskip_generation_tokens_per_second``.

The spec-decode counters are the verifier's raw counts (as vLLM's): a draft accepted by the
verifier and then cut by a stop string, EOS or ``max_tokens`` still counts. The per-response
``spec_decode`` field counts only accepted drafts that were emitted.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
"""vLLM v1's ``request_latency_buckets`` (vllm/v1/metrics/loggers.py), for the queue time."""


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, … up to ``max_value`` (vLLM's buckets of its per-request token
    histograms, ``vllm/v1/metrics/loggers.py``). ``max_value`` ≥ 1, in tokens."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 1.0, 2.5)


class EngineMetrics:
    """The server's metrics in their own registry (so several apps can live in one process).

    Args:
        model_name: the ``model_name`` label value.
        window_seconds: the window of the two rate gauges (seconds).
        max_model_len: the largest bucket of the per-request token histograms (tokens).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, window_seconds: float = 30.0, max_model_len: int = 8192):
        self.registry = CollectorRegistry()
        self.window_seconds = window_seconds
        self._started = time.monotonic()
        self._window: deque[tuple[float, int, int, int]] = deque()
        self._lock = threading.Lock()
        labels, r = ["model_name"], self.registry

        def counter(name, doc):
            return Counter(f"layerskip_{name}", doc, labels, registry=r).labels(model_name)

        def gauge(name, doc):
            return Gauge(f"layerskip_{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"layerskip_{name}", doc, labels, buckets=buckets,
                             registry=r).labels(model_name)

        self.num_drafts = counter("spec_decode_num_drafts", "Speculative rounds run (per sequence).")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted (bonus tokens not counted).")
        self.accepted_per_pos = Counter(
            "layerskip_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0-based; vLLM's name).",
            labels + ["position"], registry=r)
        self.rounds = Counter(
            "layerskip_spec_decode_rounds",
            "Rounds run (one per drafting group) by the number of drafts chosen and the exit layer "
            "(num_speculations 0: plain decoding, exit_layer 0).",
            labels + ["exit_layer", "num_speculations"], registry=r)
        self.cost_ratio = gauge("spec_decode_draft_verify_cost_ratio",
                                "Measured seconds of one draft step over one verify call, at the "
                                "engine's exit layer (the controller's running average).")
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens returned.")
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc",
                                    "Fraction of KV cache blocks in use, 0..1 (vLLM's name).")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Tokens looked up in the prefix cache (admissions).")
        self.prefix_cache_hits = counter("prefix_cache_hits",
                                         "Looked-up tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions",
                                       "Sequences preempted for want of KV blocks (recomputed "
                                       "later).")
        self.acceptance_rate = gauge("spec_decode_acceptance_rate",
                                     "Accepted / drafted tokens over the recent window, in [0, 1].")
        self.tokens_per_second = gauge("generation_tokens_per_second",
                                       "Generated tokens per second over the recent window.")
        self.acceptance_rate.set_function(self._window_acceptance)
        self.tokens_per_second.set_function(self._window_tokens_per_second)
        self.request_success = Counter("layerskip_request_success", "Finished requests.",
                                       labels + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token (seconds).")
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency (seconds).")
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request (seconds).")
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Time from arrival until the scheduler admitted the request "
                                    "(vLLM's WAITING phase; seconds).", REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens",
                                               "Prompt tokens per finished request.", token_buckets)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", token_buckets)
        self.itl = Histogram("layerskip_inter_token_latency_seconds",
                             "Time between a sequence's consecutive output tokens, one observation "
                             "per token (a round's gap split evenly over its tokens; seconds).", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)

    def observe_step(self, stats, now: float | None = None) -> None:
        """Add one engine step's counters (an ``engine.stats.StepStats``)."""
        now = time.monotonic() if now is None else now
        self.num_drafts.inc(stats.num_drafts)
        self.num_draft_tokens.inc(stats.num_draft_tokens)
        self.num_accepted_tokens.inc(stats.num_accepted_tokens)
        for pos, n in enumerate(stats.num_accepted_tokens_per_pos):
            self.accepted_per_pos.labels(self.model_name, str(pos)).inc(n)
        for (exit_layer, k), n in stats.rounds.items():
            self.rounds.labels(self.model_name, str(exit_layer), str(k)).inc(n)
        if stats.draft_verify_cost_ratio is not None:
            self.cost_ratio.set(stats.draft_verify_cost_ratio)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prefix_cache_queries.inc(stats.num_prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.num_prefix_cache_hits)
        self.num_preemptions.inc(stats.num_preemptions)
        for f in stats.finished:
            self.request_success.labels(self.model_name, f.finish_reason).inc()
            self.e2e.observe(f.e2e_latency)
            self.queue_time.observe(f.queue_time)
            self.request_prompt_tokens.observe(f.num_prompt_tokens)
            self.request_generation_tokens.observe(f.num_generation_tokens)
            if f.time_to_first_token is not None:
                self.ttft.observe(f.time_to_first_token)
            if f.time_per_output_token is not None:
                self.tpot.observe(f.time_per_output_token)
        for seconds, tokens in stats.inter_token_latencies:
            for _ in range(tokens):
                self.itl.observe(seconds)
        with self._lock:
            self._window.append((now, stats.num_accepted_tokens, stats.num_draft_tokens,
                                 stats.num_generation_tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._window and self._window[0][0] < now - self.window_seconds:
            self._window.popleft()

    def _window_acceptance(self) -> float:
        with self._lock:
            self._trim(time.monotonic())
            drafted = sum(w[2] for w in self._window)
            return sum(w[1] for w in self._window) / drafted if drafted else 0.0

    def _window_tokens_per_second(self) -> float:
        with self._lock:
            now = time.monotonic()
            self._trim(now)
            span = min(self.window_seconds, max(now - self._started, 1e-3))  # young servers
            return sum(w[3] for w in self._window) / span

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
