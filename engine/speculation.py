"""Adaptive speculation: how many tokens each sequence drafts this round.

A draft pays only while the exit layer agrees often enough with the last one. LayerSkip-trained
models agree on most tokens at shallow exits; an ordinary checkpoint agrees on a few percent,
and then every draft is wasted work. In the spirit of DEL (Zarch et al. 2025, "DEL: Context-Aware
Dynamic Exit Layer for Efficient Self-Speculative Decoding"), which adapts the exit layer and
speculation length to the context, each sequence here keeps a running estimate of its per-token
acceptance rate α and drafts the ``k ∈ 0..k_max`` that maximises the modelled speedup

    speedup(k) = (1 − α^{k+1}) / (1 − α) · (L + h) / (k · (E + h) + L + h)

in layer-call units at small batch (latency-bound): a round drafts ``k`` tokens through ``E``
layers plus the LM head (cost ``h`` layers' worth, from parameter counts), then verifies all
``k + 1`` in one pass over the rest; plain decoding costs ``L + h`` per token. A sequence starts
drafting when some ``k`` is modelled to gain :data:`START_GAIN` and keeps drafting until none
reaches :data:`KEEP_GAIN` (hysteresis). A sequence that stopped probes again with a one-draft
round after ``probe_interval`` plain rounds; each failed probe doubles the interval (up to
:data:`MAX_PROBE_INTERVAL`); an accepted one resets it and probes again at once, so a run of
accepted probes lifts the estimate back over the start threshold. Plain Python over numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

EMA_DECAY = 0.9  # weight of the past per round (a memory of about ten rounds)
PRIOR_ACCEPTED, PRIOR_EXAMINED = 1.0, 2.0  # α = 0.5 before any evidence
FIRST_PROBE_INTERVAL = 4  # rounds (tokens) of plain decoding before the first re-probe
MAX_PROBE_INTERVAL = 64
START_GAIN = 1.02  # a sequence that does not draft starts when some k is modelled to gain this
KEEP_GAIN = 0.95  # a drafting sequence stops only when no k is modelled to reach this
# The gap between the two keeps a sequence whose acceptance hovers near break-even from flapping
# between drafting and a probe interval of plain decoding.
TIE = 0.9  # a longer draft whose modelled gain is within 10 % of the best is preferred


@dataclass
class SpecState:
    """One sequence's acceptance estimate (EMAs of drafts accepted and drafts examined)."""

    accepted: float = PRIOR_ACCEPTED
    examined: float = PRIOR_EXAMINED
    rounds_until_probe: int = 0
    probe_interval: int = FIRST_PROBE_INTERVAL
    drafting: bool = True

    @property
    def acceptance(self) -> float:
        """Estimated per-token acceptance rate α in [0, 1]."""
        return self.accepted / self.examined if self.examined > 0 else 0.0


def modelled_speedup(k: int, alpha: float, exit_layer: int, num_layers: int, head_cost: float) -> float:
    """Tokens per round over its cost, relative to plain decoding (the formula above)."""
    alpha = min(alpha, 0.999999)
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
    full = num_layers + head_cost
    return tokens * full / (k * (exit_layer + head_cost) + full)


def best_num_speculations(alpha: float, k_max: int, exit_layer: int, num_layers: int,
                          head_cost: float, min_gain: float = START_GAIN) -> int:
    """The ``k`` in ``0..k_max`` with the highest modelled speedup (0 unless some ``k`` reaches
    ``min_gain``); near-ties (within :data:`TIE`) go to the longer draft, since each round's
    fixed costs, which the model leaves out, favour fewer, longer rounds."""
    gains = [modelled_speedup(k, alpha, exit_layer, num_layers, head_cost)
             for k in range(1, k_max + 1)]
    if not gains or max(gains) <= min_gain:
        return 0
    return max(k for k, gain in enumerate(gains, 1) if gain >= TIE * max(gains))


class SpeculationPolicy:
    """Chooses each sequence's drafts per round and learns from what it accepted.

    Args:
        num_layers: ``L``.
        head_cost: the LM head's cost in layers (its parameters over one layer's).
        adaptive: False drafts ``k_max`` every round (no adaptation).
    """

    def __init__(self, num_layers: int, head_cost: float, adaptive: bool = True):
        self.num_layers = num_layers
        self.head_cost = head_cost
        self.adaptive = adaptive

    def choose(self, state: SpecState, k_max: int, exit_layer: int) -> int:
        """This round's ``k`` for a sequence with the given state (``0..k_max``)."""
        if not self.adaptive or k_max == 0:
            return k_max
        k = self._best(state, k_max, exit_layer)
        state.drafting = k > 0
        if k:
            return k
        if state.rounds_until_probe <= 0:
            return 1  # a probe: one draft, the cheapest evidence
        state.rounds_until_probe -= 1
        return 0

    def _best(self, state: SpecState, k_max: int, exit_layer: int) -> int:
        return best_num_speculations(state.acceptance, k_max, exit_layer, self.num_layers,
                                     self.head_cost, KEEP_GAIN if state.drafting else START_GAIN)

    def observe(self, state: SpecState, k: int, num_accepted: int, k_max: int, exit_layer: int) -> None:
        """Update the estimate after a round that drafted ``k`` and accepted ``num_accepted``.

        A round examines its drafts up to the first rejection: ``j + 1`` of them, or ``k`` when
        all pass. After a round that leaves the sequence without a ``k`` worth drafting, the next
        probe waits ``probe_interval`` rounds, which doubles each time; an accepted draft resets it.
        """
        if k == 0:
            return
        examined = num_accepted + 1 if num_accepted < k else k
        state.accepted = EMA_DECAY * state.accepted + num_accepted
        state.examined = EMA_DECAY * state.examined + examined
        if not self.adaptive:
            return
        if num_accepted or self._best(state, k_max, exit_layer):
            state.probe_interval = FIRST_PROBE_INTERVAL
            state.rounds_until_probe = 0
        else:
            state.rounds_until_probe = state.probe_interval
            state.probe_interval = min(2 * state.probe_interval, MAX_PROBE_INTERVAL)
