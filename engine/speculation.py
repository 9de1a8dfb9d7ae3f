"""The speculation controller: each round, how many tokens each drafting group drafts.

A draft pays only when the tokens it adds are worth more than the time it costs, and on a real
machine neither side is what a parameter count says: a verify call over ``k + 1`` tokens costs
more than a one-token call, and a call's fixed costs (mask, RoPE gather, embedding, LM head, host
transfer) are a large share of a small draft step. So both sides are measured:

- **Costs from the clock** (:class:`CostTable`): the engine times each round it runs (whole
  calls; ``spec_decode`` ends every round with its one host transfer, so the wall time of the call
  is the round's real cost, CUDA included, and timing adds no host sync), keyed by exit layer
  ``E``, batch size ``B`` and ``k``; a running mean that becomes an exponential moving average
  (:data:`COST_MEMORY` observations), so it follows load. A short start-up calibration seeds every
  ``k`` at batch sizes 1, 2, 4, … ``max_num_seqs`` (:meth:`SpeculationController.calibrate`);
  other batch sizes interpolate until measured. The engine's own per-step work outside the rounds
  (stop checks, detokenizing) is timed too and added to every option, since longer rounds
  amortise it.
  Sampled rounds are priced from a table of their own (falling back to the greedy one times the
  measured sampled / greedy ratio).
- **Acceptance from the data** (:class:`SpecState`): per sequence and per draft position ``i``,
  moving averages of how often position ``i`` was examined and accepted, so ``α_i`` is the
  acceptance of draft ``i`` given drafts ``1..i−1`` were accepted; shrunk towards a prior, the
  batch's recent history at that position (:class:`AcceptancePrior`), with weight
  :data:`PRIOR_WEIGHT` rounds. A sequence's own evidence fades while it does not draft, so it
  drifts back to the batch's prior and gets another chance.

Each round, per group of sequences sharing an exit layer, the controller picks the plan with the
highest expected tokens per second of the whole batch,

    (Σ_drafting E_b[tokens | k] + #plain) / (T(E, m, k) + T(plain, B − m) + T_step(B)),
    E_b[tokens | k] = 1 + Σ_{i=1..k} Π_{j<i} α_{b,j},

over ``k ∈ 1..k_max`` and ``m`` drafting rows (the rows most likely to accept, ``m`` from 1, 2,
4, … and ``B``), and the plan ``k = 0`` for all (plain decoding, always on the menu, so speculation
never loses by the model's own measure). When plain wins for a group, a one-draft probe round runs
after :data:`FIRST_PROBE_INTERVAL` rounds, the interval doubling on each probe that does not
change the decision, up to :data:`MAX_PROBE_INTERVAL` — the evidence that lets a context whose
drafts start to agree turn speculation back on — but after the first one never so often that the
probes' extra time exceeds :data:`PROBE_BUDGET` of the plain rounds' (a model whose one-draft
rounds cost twice a plain one probes every 100 rounds). Likewise every :data:`LONGER_PROBE_INTERVAL` drafting
rounds one drafts one token more than chosen, so the next position's acceptance stays measured. DEL (Zarch et al. 2025, arXiv 2504.05598) and
the SpecDec++ / BanditSpec line adapt the speculation length to context in the same spirit; this
one prices it by measured time. Plain Python over numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COST_MEMORY = 16  # observations: the running mean becomes an EMA of this memory
SEQ_DECAY = 0.9  # per observed round: a sequence's acceptance memory (about ten rounds)
IDLE_DECAY = 0.97  # per round without drafting: its evidence fades towards the prior
PRIOR_DECAY = 0.98  # per observed row-round: the batch's history
PRIOR_WEIGHT = 2.0  # rounds' worth of prior in a sequence's estimate
PRIOR_ALPHA = 0.5  # the batch prior before any evidence
FIRST_PROBE_INTERVAL = 4  # plain rounds before a group probes with one draft
MAX_PROBE_INTERVAL = 64
LONGER_PROBE_INTERVAL = 16  # drafting rounds between rounds that try one more draft
PROBE_BUDGET = 0.01  # probes may cost at most this share of the plain rounds' time
CALIBRATION_REPEATS = 3  # timed rounds per (batch size, k) at start-up, after one warm-up


def _observe(accepted: list[float], examined: list[float], k: int, num_accepted: int,
             decay: float) -> None:
    """Fold one round (``k`` drafts, ``num_accepted`` of them accepted) into per-position EMAs
    in place: every position decays by ``decay``; positions ``0..num_accepted`` (up to ``k − 1``)
    were examined, and the first ``num_accepted`` of them accepted."""
    while len(examined) < k:
        accepted.append(0.0)
        examined.append(0.0)
    for i in range(len(examined)):
        accepted[i] *= decay
        examined[i] *= decay
    for i in range(min(num_accepted + 1, k)):
        examined[i] += 1.0
        accepted[i] += 1.0 if i < num_accepted else 0.0


@dataclass
class SpecState:
    """One sequence's acceptance evidence: per draft position, EMAs of rounds that examined it
    and of rounds that accepted it (a round examines drafts up to its first rejection)."""

    accepted: list[float] = field(default_factory=list)
    examined: list[float] = field(default_factory=list)

    def observe(self, k: int, num_accepted: int) -> None:
        """A round that drafted ``k`` and accepted ``num_accepted`` (``0..k``)."""
        _observe(self.accepted, self.examined, k, num_accepted, SEQ_DECAY)

    def idle(self) -> None:
        """A round in which the sequence did not draft."""
        self.accepted = [a * IDLE_DECAY for a in self.accepted]
        self.examined = [e * IDLE_DECAY for e in self.examined]

    def alphas(self, prior: list[float], weight: float = PRIOR_WEIGHT) -> list[float]:
        """``α_i`` for ``i < len(prior)``: the own evidence shrunk towards ``prior``."""
        out = []
        for i, p in enumerate(prior):
            if i < len(self.examined):
                out.append((self.accepted[i] + weight * p) / (self.examined[i] + weight))
            else:
                out.append(p)
        return out


class AcceptancePrior:
    """The batch's recent per-position acceptance: EMAs over every row-round observed; each
    position's rate is shrunk towards the one before it (by :data:`PRIOR_WEIGHT` rounds), so a
    position seldom examined is not judged on a handful of rounds."""

    def __init__(self, alpha: float = PRIOR_ALPHA, weight: float = PRIOR_WEIGHT):
        self.accepted, self.examined = [alpha * weight], [weight]

    def observe(self, k: int, num_accepted: int) -> None:
        """One row's round (as :meth:`SpecState.observe`)."""
        _observe(self.accepted, self.examined, k, num_accepted, PRIOR_DECAY)

    def rates(self, n: int) -> list[float]:
        """``n`` per-position rates."""
        out, last = [], PRIOR_ALPHA
        for i in range(n):
            if i < len(self.examined):
                last = (self.accepted[i] + PRIOR_WEIGHT * last) / (self.examined[i] + PRIOR_WEIGHT)
            out.append(last)
        return out


def _cumulative_tokens(alphas: list[float]) -> list[float]:
    """``[expected_tokens(alphas, k) for k in 0..len(alphas)]`` in one pass."""
    out, run = [1.0], 1.0
    for a in alphas:
        run *= a
        out.append(out[-1] + run)
    return out


def expected_tokens(alphas: list[float], k: int) -> float:
    """Tokens a round of ``k`` drafts emits on average: ``1 + Σ_{i≤k} Π_{j<i} α_j``."""
    total, run = 1.0, 1.0
    for a in alphas[:k]:
        run *= a
        total += run
    return total


class CostTable:
    """Measured seconds per round, keyed ``(exit_layer, batch_size, k)`` (plain rounds use
    ``exit_layer = 0``), and per step outside the rounds, keyed by batch size.

    An entry is a running mean of its first :data:`COST_MEMORY` observations, then an EMA of
    that memory. An unmeasured batch size is interpolated linearly between the nearest measured
    ones with the same ``(exit_layer, k)`` (proportionally beyond the largest); an unmeasured
    exit layer takes the engine's exit layer's figure plus ``k`` draft steps' worth of the
    per-layer cost difference (``(plain − draft step) / (L − E₀)`` per layer).

    Sampled rounds (temperature, penalties, truncation) cost more than greedy ones, by a different
    share at each ``k``, so they keep their own table, with ``fallback`` the greedy one: an entry
    not measured in sampled mode is the greedy entry times the running mean of measured sampled /
    greedy ratios.
    """

    def __init__(self, num_layers: int, exit_layer: int, fallback: CostTable | None = None):
        self.num_layers, self.exit_layer = num_layers, exit_layer
        self.fallback = fallback
        self.factor = [1.0, 0.0]  # sampled / greedy: [mean, count]
        self.rounds: dict[tuple[int, int], dict[int, list[float]]] = {}  # (E, k) -> B -> [mean, n]
        self.steps: dict[int, list[float]] = {}
        self.draft_step: dict[tuple[int, int], list[float]] = {}  # (E, B) -> one draft step
        self.verify: dict[tuple[int, int, int], list[float]] = {}  # (E, B, k) -> verify call

    @staticmethod
    def _add(table: dict, key, seconds: float) -> None:
        entry = table.setdefault(key, [seconds, 0.0])
        entry[1] += 1
        entry[0] += (seconds - entry[0]) / min(entry[1], COST_MEMORY)

    def observe_round(self, exit_layer: int, batch_size: int, k: int, seconds: float,
                      draft_step: float | None = None, verify: float | None = None) -> None:
        """A round's wall time (seconds); optionally its per-call breakdown (one draft step, the
        verify call), for the cost-ratio gauge and the benchmark's ideal speedup."""
        greedy = self.fallback.round(exit_layer, batch_size, k) if self.fallback else None
        if greedy:
            self.factor[1] += 1
            self.factor[0] += (seconds / greedy - self.factor[0]) / min(self.factor[1], COST_MEMORY)
        self._add(self.rounds.setdefault((exit_layer if k else 0, k), {}), batch_size, seconds)
        if k and draft_step is not None:
            self._add(self.draft_step, (exit_layer, batch_size), draft_step)
        if k and verify is not None:
            self._add(self.verify, (exit_layer, batch_size, k), verify)

    def observe_step(self, batch_size: int, seconds: float) -> None:
        """A step's time outside its rounds (seconds), for ``batch_size`` decoding sequences."""
        self._add(self.steps, batch_size, max(0.0, seconds))

    def step_overhead(self, batch_size: int) -> float:
        """The step's time outside its rounds (seconds; 0 until measured)."""
        value = _interpolate(self.steps, batch_size)
        if value is None and self.fallback is not None:
            return self.fallback.step_overhead(batch_size)
        return value or 0.0

    def round(self, exit_layer: int, batch_size: int, k: int) -> float | None:
        """Predicted seconds of a round of ``k`` drafts for ``batch_size`` rows (0 rows: 0)."""
        if batch_size <= 0:
            return 0.0
        value = _interpolate(self.rounds.get((exit_layer if k else 0, k), {}), batch_size)
        if value is None and self.fallback is not None:
            greedy = self.fallback.round(exit_layer, batch_size, k)
            return None if greedy is None else greedy * self.factor[0]
        if value is not None or not k or exit_layer == self.exit_layer:
            return value
        base = self.round(self.exit_layer, batch_size, k)
        layer = self.layer_cost(batch_size)
        if base is None or layer is None:
            return None
        return max(1e-9, base + k * (exit_layer - self.exit_layer) * layer)

    def layer_cost(self, batch_size: int) -> float | None:
        """Seconds of one layer on one token per row, from plain steps and draft steps."""
        plain = self.round(0, batch_size, 0)
        drafts = {b: v for (e, b), v in self.draft_step.items() if e == self.exit_layer}
        draft = _interpolate(drafts, batch_size)
        if plain is None or draft is None or self.num_layers == self.exit_layer:
            return None
        return max(0.0, (plain - draft) / (self.num_layers - self.exit_layer))

    def cost_ratio(self, exit_layer: int, batch_size: int, k: int) -> float | None:
        """One measured draft step over the measured verify call of ``k + 1`` tokens."""
        d = self.draft_step.get((exit_layer, batch_size))
        v = self.verify.get((exit_layer, batch_size, k))
        return d[0] / v[0] if d and v and v[0] > 0 else None


def _interpolate(known: dict[int, list[float]], x: int) -> float | None:
    """``known[x][0]`` (a ``[mean, count]`` entry), else linear between the nearest keys around
    ``x``, else proportional beyond the largest (the smallest's below it)."""
    entry = known.get(x)
    if entry is not None:
        return entry[0]
    if not known:
        return None
    below = [b for b in known if b < x]
    above = [b for b in known if b > x]
    if below and above:
        lo, hi = max(below), min(above)
        return known[lo][0] + (known[hi][0] - known[lo][0]) * (x - lo) / (hi - lo)
    ref = max(below) if below else min(above)
    return known[ref][0] * x / ref if below else known[ref][0]


@dataclass
class _GroupState:
    drafting_rounds: int = 0
    plain_rounds: int = 0
    probe_interval: int = FIRST_PROBE_INTERVAL


class SpeculationController:
    """Chooses each round's drafts from measured costs and measured acceptance.

    Args:
        num_layers: ``L``.
        exit_layer: the engine's exit layer ``E₀`` (calibrated at start-up).
        adaptive: False drafts ``k_max`` every round (no control).
    """

    def __init__(self, num_layers: int, exit_layer: int, adaptive: bool = True):
        self.adaptive = adaptive
        self.costs = CostTable(num_layers, exit_layer)
        self.sampled_costs = CostTable(num_layers, exit_layer, fallback=self.costs)
        self.prior = AcceptancePrior()
        self._groups: dict[int, _GroupState] = {}

    def calibrate(self, time_round, batch_sizes: list[int], exit_layer: int, k_max: int,
                  repeats: int = CALIBRATION_REPEATS) -> None:
        """Seed the cost table: ``time_round(B, k) -> (seconds, draft_step, verify)`` for every
        ``B`` in ``batch_sizes`` and ``k`` in ``0..k_max``, one warm-up then the median of
        ``repeats`` runs."""
        for B in batch_sizes:
            for k in range(k_max + 1):
                time_round(B, k)
                runs = sorted((time_round(B, k) for _ in range(repeats)), key=lambda r: r[0])
                seconds, draft, verify = runs[len(runs) // 2]
                self.costs.observe_round(exit_layer, B, k, seconds, draft, verify)

    def plan(self, states: list[SpecState], rooms: list[int], exit_layer: int, k_max: int,
             sampled: bool = False) -> list[int]:
        """Each row's ``k`` this round (0 for rows that decode plainly, else the group's ``k``).

        Args:
            states: the rows' acceptance evidence.
            rooms: the most drafts each row may use (its remaining tokens less one).
            exit_layer: the group's ``E``.
            k_max: the most drafts per round.
            sampled: whether the round samples (prices it from the sampled-round table).
        """
        B = len(states)
        if not self.adaptive or k_max == 0 or not B:
            return [min(k_max, r) for r in rooms]
        costs = self.sampled_costs if sampled else self.costs
        k, m, order = self._best(states, rooms, exit_layer, k_max, costs)
        group = self._groups.setdefault(exit_layer, _GroupState())
        if k:
            group.plain_rounds, group.probe_interval = 0, FIRST_PROBE_INTERVAL
            group.drafting_rounds += 1
            if k < k_max and group.drafting_rounds % LONGER_PROBE_INTERVAL == 0:
                k += 1  # keep the next position's acceptance measured, or it is never tried
        else:
            group.plain_rounds += 1
            if group.plain_rounds > group.probe_interval and (
                    group.probe_interval == FIRST_PROBE_INTERVAL
                    or group.plain_rounds >= self._probe_spacing(exit_layer, B, costs)):
                group.plain_rounds = 0
                group.probe_interval = min(2 * group.probe_interval, MAX_PROBE_INTERVAL)
                k, m = 1, B
        chosen = set(order[:m])
        return [min(k, rooms[b]) if b in chosen else 0 for b in range(B)]

    @staticmethod
    def _probe_spacing(exit_layer: int, batch_size: int, costs: CostTable) -> float:
        """Plain rounds per probe that keep the probes within :data:`PROBE_BUDGET`."""
        plain = costs.round(0, batch_size, 0)
        probe = costs.round(exit_layer, batch_size, 1)
        if not plain or probe is None:
            return 0.0
        return max(0.0, probe - plain) / plain / PROBE_BUDGET

    def _best(self, states, rooms, exit_layer, k_max, c: CostTable) -> tuple[int, int, list[int]]:
        """``(k, m, rows by expected tokens)`` with the highest expected tokens per second."""
        B = len(states)
        prior = self.prior.rates(k_max)
        cums = [_cumulative_tokens(s.alphas(prior)) for s in states]  # [k] -> E[tokens | k]
        gains = {k: [cum[min(k, r)] for cum, r in zip(cums, rooms)] for k in range(1, k_max + 1)}
        order = sorted(range(B), key=lambda b: -gains[k_max][b])
        overhead = c.step_overhead(B)
        plain = c.round(0, B, 0)
        if plain is None:
            return k_max, B, order  # nothing measured (no calibration): draft as configured
        best, best_k, best_m = B / (plain + overhead), 0, 0
        sizes = sorted({B} | {1 << i for i in range(B.bit_length()) if 1 << i < B})
        for k in range(1, k_max + 1):
            ranked = [gains[k][b] for b in order]
            for m in sizes:
                spec = c.round(exit_layer, m, k)
                if spec is None:
                    continue
                rate = (sum(ranked[:m]) + B - m) / (spec + c.round(0, B - m, 0) + overhead)
                if rate > best:
                    best, best_k, best_m = rate, k, m
        return best_k, best_m, order

    def merge_pays(self, exit_layer: int, num_drafting: int, num_plain: int, k: int,
                   sampled: bool = False) -> bool:
        """Whether ``num_plain`` plain rows cost less as rows of the drafting group's round
        (``num_drafting`` rows, ``k`` drafts; they use none of its drafts) than in a plain round
        of their own, by the measured cost table (issue 9: "sequences at k = 0 ride in the
        drafting group's verify call"). False while either price is unmeasured."""
        costs = self.sampled_costs if sampled else self.costs
        merged = costs.round(exit_layer, num_drafting + num_plain, k)
        apart, plain = costs.round(exit_layer, num_drafting, k), costs.round(0, num_plain, 0)
        if merged is None or apart is None or plain is None:
            return False
        return merged <= apart + plain

    def observe(self, state: SpecState, k: int, num_accepted: int) -> None:
        """A row's round: ``k`` drafts (0: it decoded plainly), ``num_accepted`` of them kept."""
        if not k:
            state.idle()
            return
        state.observe(k, num_accepted)
        self.prior.observe(k, num_accepted)

    def observe_round(self, exit_layer: int, batch_size: int, k: int, seconds: float,
                      draft_step: float | None = None, verify: float | None = None,
                      sampled: bool = False) -> None:
        """A round's measured time (see :meth:`CostTable.observe_round`), greedy or sampled."""
        table = self.sampled_costs if sampled else self.costs
        table.observe_round(exit_layer, batch_size, k, seconds, draft_step, verify)

    def observe_step(self, batch_size: int, seconds: float, sampled: bool = False) -> None:
        """A decode step's time outside its rounds (see :meth:`CostTable.observe_step`)."""
        (self.sampled_costs if sampled else self.costs).observe_step(batch_size, seconds)

