"""The engine's per-step counters, as plain dataclasses (no torch, no Prometheus types).

They travel in every step message to the API process, which unpickles them: a class defined in
a module that imports torch (``engine.loop``) would make that process import torch, for seconds,
on its event loop, at the first step message.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FinishedStats:
    """Timings of one finished request (seconds), for the latency histograms."""

    e2e_latency: float
    time_to_first_token: float | None
    time_per_output_token: float | None
    finish_reason: str
    queue_time: float = 0.0
    """From arrival to the step that admitted it (seconds; vLLM's time in the WAITING phase);
    to its end if it never ran."""
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


@dataclass
class StepStats:
    """Plain counters of one step, handed to :mod:`engine.metrics` (no Prometheus types here)."""

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    """Per draft position ``i`` (0-based), the rows whose draft ``i + 1`` the verifier accepted
    (vLLM's raw per-position counts: a draft later cut by a stop still counts)."""
    num_examined_per_pos: list[int] = field(default_factory=list)
    """Per draft position ``i``, the rows whose draft ``i + 1`` the verifier examined (all drafts
    before it accepted): ``accepted / examined`` is the acceptance at that position."""
    rounds: dict[tuple[int, int], int] = field(default_factory=dict)
    """Rounds run per ``(exit_layer, k)`` (one per group; ``k = 0``: plain, exit layer 0)."""
    draft_verify_cost_ratio: float | None = None
    """The controller's measured draft step over verify call at the engine's exit layer."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    """The fraction of KV blocks in use after the step (0..1)."""
    num_prefix_cache_queries: int = 0
    """Tokens looked up in the prefix cache since the last stats."""
    num_prefix_cache_hits: int = 0
    """Of which found."""
    num_preemptions: int = 0
    """Sequences preempted since the last stats."""
    finished: list[FinishedStats] = field(default_factory=list)
    inter_token_latencies: list[tuple[float, int]] = field(default_factory=list)
    """Per sequence that emitted after its first step: (seconds since its previous emission
    divided by the tokens emitted, tokens emitted): a round's gap split evenly over its tokens."""
