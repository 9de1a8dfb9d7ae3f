"""Token choice and the speculative acceptance rules, on one round's logits.

Every row of a batch has its own :class:`~engine.request.SamplingParams`. Logits are processed in
vLLM's order: repetition penalty (prompt and generated tokens), frequency and presence penalties
(generated tokens), temperature, then top-k, top-p and min-p truncation. Draft and target
distributions go through the same processing with the same token history (the drafts before a
position count as generated), so the penalties act identically in drafting and verification.

Three acceptance rules, chosen per row:

- **greedy** (``temperature == 0``): accept the longest prefix of drafts equal to the full
  model's argmax, then emit the full model's own argmax (LayerSkip §5.2).
- **rejection sampling** (sampled, no ``seed``): accept draft ``d`` with probability
  ``min(1, p(d) / q(d))``; at the first rejection emit a sample of ``norm(max(0, p − q))``; if all
  ``k`` pass, emit a sample of ``p_k`` (Leviathan et al. 2023, Alg. 1; Chen et al. 2023, Alg. 2).
  Every emitted token is distributed exactly as plain sampling from ``p``.
- **coupled** (sampled, with ``seed``): the token at position ``n`` is
  ``argmax(log p_n + g_n)`` with Gumbel noise ``g_n`` that depends only on the seed and ``n``
  (the Gumbel-max trick), and the draft uses the same ``g_n`` on its own ``q_n``. A draft is
  accepted when it equals the full model's sample. Plain decoding with the same seed draws the
  same ``g_n``, so a seeded request's output is the same with speculation on or off, in any
  batch; each token is still an exact sample from ``p_n``. Acceptance is somewhat lower than
  rejection sampling's ``1 − TV(p, q)``, at least ``(1 − TV)/(1 + TV)`` (Daliri, Musco and
  Suresh 2024, "Coupling without Communication and Drafter-Invariant Speculative Decoding").

Seeded rows draw their noise from generators keyed by ``(seed, position)`` (:func:`noise_seed`),
never from a shared one, so a row's draws do not depend on what else is in the batch. A position
past a round's last emitted token is drafted (and verified) again next round with the same noise;
that is what makes the coupling exact, and each position's noise still decides exactly one
emitted token given the true prefix. Unseeded rows need no shared noise: they are sampled by
inverse transform (one uniform per row and position against the float64 cumulative distribution,
:func:`sample_categorical`), for the whole batch at once, from the engine's generator (seeded by
``EngineConfig.seed``, so a whole run repeats for the same arrivals). On the CPU that is 6-10x
cheaper than Gumbel-max noise over the vocabulary, which drew one random number per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import SamplingParams

_MASK64 = (1 << 64) - 1


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` → ``(...)`` the index of each row's largest score, the first of ties, as
    ``torch.argmax``: through ``max``, which on the CPU is 1.4-3× faster (43 against 126 µs on
    ``(8, 3, 4096)``: the one-draft-verify logits of batch 8)."""
    return scores.max(-1).indices


def noise_seed(key: int, position: int) -> int:
    """A 63-bit generator seed from a request's seed and a token position (SplitMix64's mixer)."""
    z = (key * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class SamplingBatch:
    """One round's per-row sampling state, built by :meth:`build`.

    Attributes:
        params: each row's parameters (``B``).
        keys: each row's noise key (its seed, for seeded rows).
        positions: each row's position of the token its first logits row predicts.
        temperature: ``(B, 1, 1)``, 1.0 on greedy rows.
        top_k, top_p, min_p: ``(B, 1, 1)`` or None when no row truncates that way.
        max_top_k: the largest ``top_k`` below ``V`` (``V`` if none), known on the host.
        presence, frequency, repetition: ``(B, 1, 1)`` or None when no row has penalties.
        output_counts: ``(B, V)`` generated-token counts, or None without penalties.
        seen: ``(B, V)`` bool, prompt or generated, or None without a repetition penalty.
        generator: the engine's generator, for the unseeded rows' noise.
    """

    params: list[SamplingParams]
    keys: list[int]
    positions: list[int]
    temperature: torch.Tensor
    top_k: torch.Tensor | None = None
    max_top_k: int = 0
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    presence: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    generator: torch.Generator | None = None

    @property
    def all_greedy_plain(self) -> bool:
        """Greedy rows without penalties only: raw argmax suffices."""
        return all(p.greedy and not p.has_penalties for p in self.params)

    @classmethod
    def build(cls, params: list[SamplingParams], keys: list[int], positions: list[int],
              prompts: list[list[int]], outputs: list[list[int]], vocab_size: int,
              device, generator: torch.Generator | None = None) -> "SamplingBatch":
        """Per-row tensors for ``B = len(params)`` rows.

        Args:
            prompts, outputs: each row's prompt and generated tokens (for the penalties).
            vocab_size: ``V``.
        """
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None, None]

        sb = cls(params, keys, positions,
                 column([1.0 if p.greedy else p.temperature for p in params]), generator=generator)
        if any(p.top_k > 0 and not p.greedy for p in params):
            ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
            sb.top_k = column(ks, torch.long)
            sb.max_top_k = max((k for k in ks if k < vocab_size), default=vocab_size)
        if any(p.top_p < 1.0 and not p.greedy for p in params):
            sb.top_p = column([p.top_p for p in params])
        if any(p.min_p > 0.0 and not p.greedy for p in params):
            sb.min_p = column([p.min_p for p in params])
        if any(p.has_penalties for p in params):
            sb.presence = column([p.presence_penalty for p in params])
            sb.frequency = column([p.frequency_penalty for p in params])
            sb.repetition = column([p.repetition_penalty for p in params])
            sb.output_counts = _counts(outputs, vocab_size, device)
            sb.seen = (sb.output_counts + _counts(prompts, vocab_size, device)) > 0
        return sb


def _counts(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """``(B, V)`` float token counts of each row's tokens."""
    counts = torch.zeros(len(rows), vocab_size, device=device)
    index = [(b, t) for b, row in enumerate(rows) for t in row]
    if index:
        idx = torch.tensor(index, device=device)  # (N, 2)
        counts.index_put_((idx[:, 0], idx[:, 1]), torch.ones(len(index), device=device),
                          accumulate=True)
    return counts


def process_logits(logits: torch.Tensor, sb: SamplingBatch, drafts: torch.Tensor | None = None,
                   start: int = 0) -> torch.Tensor:
    """Penalties, temperature and truncation: ``(B, T, V)`` logits → ``(B, T, V)`` scores.

    Scores are log-probabilities (``-inf`` for truncated tokens) for every row; on greedy rows
    temperature is 1 and truncation keeps the most likely token, so their argmax is the
    (penalised) greedy token.

    Args:
        logits: fp32 logits; row ``t`` predicts the token after round index ``start + t``.
        drafts: ``(B, R)`` this round's drafts so far; the history of round index ``r`` includes
            ``drafts[:, :r]`` (they count as generated tokens).
        start: the round index of ``logits[:, 0]``.
    """
    scores = logits.float()
    if sb.output_counts is not None:
        counts = sb.output_counts[:, None].expand_as(scores)  # (B, T, V)
        if drafts is not None and drafts.shape[1]:
            B, R = drafts.shape
            onehot = torch.zeros(B, R, scores.shape[-1], device=scores.device)
            onehot.scatter_(2, drafts[..., None], 1.0)  # (B, R, V)
            cum = torch.cat([torch.zeros_like(onehot[:, :1]), onehot.cumsum(1)], 1)  # (B, R+1, V)
            counts = counts + cum[:, start:start + scores.shape[1]]
        seen = sb.seen[:, None] | (counts > 0)  # (B, T, V)
        penalised = torch.where(scores > 0, scores / sb.repetition, scores * sb.repetition)
        scores = torch.where(seen, penalised, scores)
        scores = scores - sb.frequency * counts - sb.presence * (counts > 0).float()
    scores = scores / sb.temperature
    if sb.top_k is not None:
        scores = _top_k(scores, sb.top_k, sb.max_top_k)
    if sb.top_p is not None:
        scores = _top_p(scores, sb.top_p)
    if sb.min_p is not None:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < sb.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores.log_softmax(-1)


TOP_P_CANDIDATES = 64
"""Tokens the CPU's top-p first looks for the nucleus among (:func:`_top_p`)."""


def _top_k(scores: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's ``top_k`` best scores (ties at the k-th score kept): ``(B, T, V)``.

    ``top_k`` is ``(B, 1, 1)``, ``V`` on rows without a limit; ``max_top_k`` the largest
    limit below ``V`` (known on the host), so a partial ``topk`` replaces a full sort.
    """
    V = scores.shape[-1]
    top = scores.topk(max_top_k, -1).values  # (B, T, max_top_k), descending
    kth = top.gather(-1, (top_k.clamp(max=max_top_k) - 1).expand(*scores.shape[:2], 1))
    kth = torch.where(top_k < V, kth, float("-inf"))  # (B, T, 1); rows without a limit keep all
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus truncation (Holtzman et al. 2020): keep the most likely tokens whose mass before
    them is at most ``top_p`` ``(B, 1, 1)`` (so the most likely token always stays).

    On the CPU the nucleus is first looked for among each row's :data:`TOP_P_CANDIDATES` most
    likely tokens (a partial ``topk``); when the last candidate is already dropped in every row
    that truncates, no token past the candidates can be kept (the dropped set only grows down
    the order), so the result is exactly the full sort's, at a fraction of its cost. Otherwise
    (or on CUDA, where the sort is cheap and a host check would sync) every row is sorted.
    """
    V = scores.shape[-1]
    if scores.device.type == "cpu" and V > TOP_P_CANDIDATES:
        probs = scores.softmax(-1)
        top, index = probs.topk(TOP_P_CANDIDATES, -1)  # (B, T, C), descending
        drop = top.cumsum(-1) - top > top_p  # (B, T, C)
        whole = top_p >= 1.0  # (B, 1, 1): rows that keep every token
        if bool((drop[..., -1] | whole[..., 0]).all()):
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, ~drop)
            return scores.masked_fill(~(keep | whole), float("-inf"))
    sorted_scores, order = scores.sort(-1, descending=True)
    probs = sorted_scores.softmax(-1)
    # The most likely token is always kept; a top_p = 1 row keeps all (its cumsum may pass 1
    # by a rounding error).
    drop = (probs.cumsum(-1) - probs > top_p) & (top_p < 1.0)
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _gumbel(key: int, position: int, shape, device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_seed(key, position))
    e = torch.empty(shape, device=device).exponential_(generator=gen)
    return -e.log()


def sample_tokens(scores: torch.Tensor, sb: SamplingBatch, start: int,
                  rows: list[int] | None = None) -> torch.Tensor:
    """Pick each row's token at every position: ``(B, T, V)`` scores → ``(B, T)``.

    Greedy rows take the argmax; seeded rows the Gumbel-max sample with the noise of ``(seed,
    position)`` (so a seeded draft shares the full model's noise); unseeded rows an inverse
    transform sample (:func:`sample_categorical`). ``rows`` limits sampling to those rows (the
    others get the argmax).
    """
    rows = [b for b, p in enumerate(sb.params) if not p.greedy] if rows is None else rows
    if not rows:
        return argmax(scores)
    B, T, V = scores.shape
    free = [b for b in rows if sb.params[b].seed is None]
    seeded = [b for b in rows if sb.params[b].seed is not None]
    tokens = argmax(scores) if len(free) < B else None  # (B, T)
    if seeded and T:
        noise = torch.stack([torch.stack([_gumbel(sb.keys[b], sb.positions[b] + start + t, V,
                                                  scores.device) for t in range(T)])
                             for b in seeded])  # (S, T, V)
        tokens[seeded] = argmax(scores[seeded] + noise)
    if free:
        drawn = sample_categorical(scores[free] if tokens is not None else scores, sb.generator)
        if tokens is None:
            return drawn
        tokens[free] = drawn
    return tokens


def sample_categorical(log_weights: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per row of ``(..., V)`` unnormalised log-weights (``-inf``: never drawn):
    ``(...)`` token ids, by inverse transform sampling (:func:`sample_weights` of their softmax).
    """
    return sample_weights(log_weights.softmax(-1), generator)


def sample_weights(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per row of ``(..., V)`` non-negative, unnormalised weights (0: never drawn):
    ``(...)`` token ids, by inverse transform sampling.

    The cumulative distribution is summed in float64, so a token keeps its chance to within
    float64 rounding (a float32 sum would absorb tokens below ~6e-8 once it nears 1). One uniform
    per row, scaled to the row's total and kept strictly below it (a product that rounds up to
    the total would fall past the last token with positive weight), so the token found always
    has positive weight.
    """
    cdf = weights.cumsum(-1, dtype=torch.float64)  # (..., V)
    total = cdf[..., -1:]  # (..., 1)
    u = torch.rand(total.shape, dtype=torch.float64, device=cdf.device,
                   generator=generator) * total  # (..., 1)
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
    index = torch.searchsorted(cdf, u, right=True)  # (..., 1)
    return index.clamp_max_(cdf.shape[-1] - 1)[..., 0]


def accept_drafts(drafts: torch.Tensor, target_scores: torch.Tensor,
                  sb: SamplingBatch | None = None, draft_scores: torch.Tensor | None = None,
                  num_speculations: list[int] | None = None):
    """The acceptance rule: how many drafts each row keeps, and the tokens it emits.

    Args:
        drafts: ``(B, k)`` drafted tokens ``d_1..d_k`` (``k`` may be 0).
        target_scores: ``(B, k + 1, V)`` processed full-model scores (``log p_0..p_k``); ``p_i``
            predicts the token after the ``i``-th draft. With ``sb`` None, raw logits (greedy).
        sb: the rows' sampling state (None: all greedy, no penalties).
        draft_scores: ``(B, k, V)`` processed draft scores (``log q``); may be None when every row
            is greedy or coupled.
        num_speculations: each row's own ``k_b ≤ k``; drafts past it are ignored (the row's
            round is exactly a ``k_b``-draft round). Default: ``k`` for every row.

    Returns:
        ``(tokens, num_accepted)``: ``tokens`` ``(B, k + 1)`` and ``num_accepted`` ``(B,)``. Row
        ``b`` emits ``tokens[b, :num_accepted[b] + 1]``: its accepted drafts and one token of
        the full model after them.
    """
    B, k = drafts.shape
    dev = target_scores.device
    if sb is None or all(p.greedy for p in sb.params):
        target = argmax(target_scores)  # (B, k+1)
        ok = drafts == target[:, :k]
        final_choices = target
    else:
        rejection = [b for b, p in enumerate(sb.params) if not p.greedy and p.seed is None]
        if k and len(rejection) == B:  # every row rejection-sampled: no argmax needed
            ok = _rejection_tests(drafts, draft_scores, target_scores, sb, None)
            final_choices = None
        else:
            noisy = [b for b, p in enumerate(sb.params)
                     if not p.greedy and (p.seed is not None or k == 0)]
            target = sample_tokens(target_scores, sb, 0, rows=noisy)  # greedy/coupled rows
            ok = drafts == target[:, :k]
            final_choices = target
            if rejection and k:
                ok[rejection] = _rejection_tests(drafts, draft_scores, target_scores, sb,
                                                 rejection)
    if num_speculations is not None:
        ok &= torch.arange(k, device=dev)[None] < torch.tensor(num_speculations, device=dev)[:, None]
    num_accepted = ok.long().cumprod(1).sum(1) if k else torch.zeros(B, dtype=torch.long, device=dev)
    final = None if final_choices is None else final_choices.gather(1, num_accepted[:, None])
    if sb is not None and k:
        final = _resample_rejected(final, num_accepted, drafts, draft_scores, target_scores, sb,
                                   num_speculations)  # (B, 1)
    tokens = torch.cat([drafts, drafts[:, :1]], 1) if k else final.clone()
    tokens.scatter_(1, num_accepted[:, None], final)
    return tokens, num_accepted


def _rejection_tests(drafts, draft_scores, target_scores, sb,
                     rows: list[int] | None) -> torch.Tensor:
    """``(R, k)`` bool: ``u < p(d) / q(d)`` for each draft of the ``R`` rejection-sampled rows
    (``rows`` None: every row, without copying the batch)."""
    k = drafts.shape[1]
    if rows is not None:
        drafts, draft_scores, target_scores = drafts[rows], draft_scores[rows], target_scores[rows]
    d = drafts[..., None]  # (R, k, 1)
    log_p = target_scores[:, :k].gather(-1, d)[..., 0]  # (R, k)
    log_q = draft_scores.gather(-1, d)[..., 0]  # (R, k)
    u = torch.rand(d.shape[0], k, device=drafts.device, generator=sb.generator)  # (R, k)
    return u.log() < log_p - log_q


def _resample_rejected(final, num_accepted, drafts, draft_scores, target_scores, sb,
                       num_speculations) -> torch.Tensor:
    """Rejection-sampled rows: at a rejection the emitted token is a sample of
    ``norm(max(0, p − q))``; with every draft accepted it is a sample of ``p`` (Leviathan et al.
    2023, Alg. 1). Greedy and coupled rows keep ``final`` (None when every row is
    rejection-sampled). Returns ``(B, 1)``."""
    rows = [b for b, p in enumerate(sb.params) if not p.greedy and p.seed is None]
    if not rows:
        return final
    every = len(rows) == len(sb.params)
    k = drafts.shape[1]
    dev = target_scores.device
    if not every:
        num_accepted, draft_scores, target_scores = (
            num_accepted[rows], draft_scores[rows], target_scores[rows])
    j = num_accepted[:, None, None]  # (R, 1, 1)
    V = target_scores.shape[-1]
    p = target_scores.gather(1, j.expand(-1, 1, V))[:, 0].exp()  # (R, V)
    q = draft_scores.gather(1, j.clamp_max(k - 1).expand(-1, 1, V))[:, 0].exp()  # (R, V)
    residual = (p - q).clamp_min_(0)  # (R, V)
    if num_speculations is None:
        short = num_accepted < k
    else:
        short = num_accepted < torch.tensor([num_speculations[b] for b in rows], device=dev)
    rejected = short & (residual.sum(-1) > 0)  # (R,)
    drawn = sample_weights(torch.where(rejected[:, None], residual, p), sb.generator)[:, None]
    if every:
        return drawn
    final[rows] = drawn
    return final
