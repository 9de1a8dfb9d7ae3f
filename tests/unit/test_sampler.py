"""The greedy acceptance rule on hand-written logits."""

import pytest
import torch

from engine.sampler import accept_drafts


def _logits_for(argmaxes: list[list[int]], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), len(argmaxes[0]), vocab)
    for b, row in enumerate(argmaxes):
        for t, tok in enumerate(row):
            logits[b, t, tok] = 1.0
    return logits


def test_longest_agreeing_prefix_plus_one():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [5, 2, 3], [1, 2, 3]])
    target = _logits_for([[1, 2, 3, 4], [1, 7, 3, 4], [1, 2, 3, 4], [1, 2, 6, 0]])
    tokens, accepted = accept_drafts(drafts, target)
    assert accepted.tolist() == [3, 1, 0, 2]
    emitted = [tokens[b, :j + 1].tolist() for b, j in enumerate(accepted.tolist())]
    assert emitted == [[1, 2, 3, 4], [1, 7], [1], [1, 2, 6]]


def test_a_later_match_after_a_mismatch_is_not_accepted():
    tokens, accepted = accept_drafts(torch.tensor([[9, 2]]), _logits_for([[1, 2, 3]], 10))
    assert accepted.tolist() == [0]
    assert tokens[0, :1].tolist() == [1]


def test_no_drafts_is_plain_decoding():
    tokens, accepted = accept_drafts(torch.zeros(2, 0, dtype=torch.long), _logits_for([[4], [6]]))
    assert accepted.tolist() == [0, 0]
    assert tokens[:, 0].tolist() == [4, 6]


# --- sampling: logits processing, rejection sampling and the seeded coupling -----------------

from collections import Counter  # noqa: E402

from engine.request import SamplingParams  # noqa: E402
from engine.sampler import SamplingBatch, process_logits, sample_tokens  # noqa: E402


def _batch(params, outputs=None, prompts=None, vocab=5, seed=0):
    B = len(params)
    return SamplingBatch.build(params, [p.seed or 0 for p in params], [10] * B,
                               prompts or [[] for _ in range(B)], outputs or [[] for _ in range(B)],
                               vocab, "cpu", torch.Generator().manual_seed(seed))


def test_penalties_follow_vllm():
    logits = torch.tensor([[[2.0, -1.0, 0.5, 1.0, 0.0]]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                            presence_penalty=0.25)
    sb = _batch([params], outputs=[[0, 0, 1]], prompts=[[3]])
    scores = process_logits(logits, sb)
    # repetition: positive seen logits halved, negative doubled (prompt 3, outputs 0 and 1);
    # then frequency (0.5 × count) and presence (0.25) on the generated tokens 0 and 1.
    expected = torch.tensor([2.0 / 2 - 0.5 * 2 - 0.25, -1.0 * 2 - 0.5 - 0.25, 0.5, 1.0 / 2, 0.0])
    assert torch.allclose(scores[0, 0], expected.log_softmax(-1))


def test_drafts_count_as_history_at_later_positions():
    logits = torch.zeros(1, 3, 5)
    sb = _batch([SamplingParams(temperature=0.0, presence_penalty=1.0)])
    scores = process_logits(logits, sb, drafts=torch.tensor([[2, 4]]), start=0)
    penalised = [(s < s.max()).nonzero().flatten().tolist() for s in scores[0]]
    assert penalised == [[], [2], [2, 4]]


def test_top_k_top_p_and_min_p_truncate():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log()[None, None]
    kept = lambda **kw: process_logits(logits, _batch([SamplingParams(**kw)]))[0, 0].isfinite().tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False, False]
    assert kept(top_p=0.3) == [True, False, False, False, False]
    assert kept(min_p=0.2) == [True, True, True, False, False]
    assert kept(temperature=0.0, top_k=1) == [True] * 5  # greedy rows are never truncated


def _chi_square_p(counts: Counter, probs: torch.Tensor, n: int) -> float:
    expected = probs * n
    stat = sum((counts[i] - expected[i].item()) ** 2 / expected[i].item() for i in range(len(probs)))
    df = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)).item()


def test_rejection_sampling_emits_exactly_p():
    """One draft from q, accepted with min(1, p/q), else a sample of norm(max(0, p − q)):
    the emitted token must follow p (Leviathan et al. 2023, Theorem 1). 20 000 rows."""
    n = 20_000
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    q = torch.tensor([0.4, 0.1, 0.1, 0.1, 0.3])
    sb = _batch([SamplingParams(temperature=1.0)] * n, seed=1)
    draft_scores = q.log().expand(n, 1, 5)
    drafts = sample_tokens(draft_scores, sb, 0)  # (n, 1) samples of q
    target = torch.stack([p.log(), p.log()])[None].expand(n, 2, 5)
    tokens, accepted = accept_drafts(drafts, target, sb, draft_scores)
    first = Counter(tokens[:, 0].tolist())
    assert _chi_square_p(first, p, n) > 1e-4
    accept_rate = accepted.float().mean().item()
    assert abs(accept_rate - torch.minimum(p, q).sum().item()) < 0.02  # 1 − TV(p, q) = 0.55


def test_seeded_rows_take_the_gumbel_max_sample_of_p_whatever_the_draft():
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    rows = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    sb = _batch(rows)
    target = p.log().expand(len(rows), 2, 5).contiguous()
    plain = sample_tokens(target[:, :1], sb, 0)[:, 0]  # what plain decoding draws at position 10
    for draft in range(5):
        tokens, accepted = accept_drafts(torch.full((len(rows), 1), draft), target, sb,
                                         torch.zeros(len(rows), 1, 5))
        assert tokens[:, 0].tolist() == plain.tolist()
        assert accepted.tolist() == (plain == draft).long().tolist()
    assert _chi_square_p(Counter(plain.tolist()), p, len(rows)) > 1e-4


def test_a_row_uses_only_its_own_number_of_drafts():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3]])
    target = _logits_for([[1, 2, 3, 4], [1, 2, 3, 4]])
    tokens, accepted = accept_drafts(drafts, target, num_speculations=[3, 1])
    assert accepted.tolist() == [3, 1]
    assert tokens[1, :2].tolist() == [1, 2]


def _sorted_reference(scores, top_k=None, top_p=None):
    """Truncation by one full sort, as the textbook writes it."""
    if top_k is not None:
        kth = scores.sort(-1, descending=True).values.gather(
            -1, top_k.expand(*scores.shape[:2], 1) - 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


@pytest.mark.parametrize("scale, in_candidates", [(10.0, True), (4.0, False), (0.05, False)])
def test_partial_top_k_and_top_p_equal_a_full_sort(scale, in_candidates):
    """Peaked rows (every nucleus among the candidates: the partial path) and flatter ones
    (the full sort) give the textbook truncation exactly."""
    from engine.sampler import TOP_P_CANDIDATES, _top_k, _top_p

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 3, 4096, generator=gen) * scale
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.99, 0.3])[:, None, None]
    top = scores.softmax(-1).topk(TOP_P_CANDIDATES, -1).values
    covered = ((top.cumsum(-1) - top)[..., -1] > top_p[..., 0]) | (top_p[..., 0] >= 1)
    assert bool(covered.all()) == in_candidates
    top_k = torch.tensor([4096, 5, 40, 1, 300])[:, None, None]
    want = _sorted_reference(scores, top_k, top_p)
    got = _top_p(_top_k(scores, top_k, 300), top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    alone, ref = _top_p(scores, top_p).isinf(), _sorted_reference(scores, None, top_p).isinf()
    truncating = [0, 2, 3, 4]  # the top_p = 1.0 row keeps every token (the sorted cumsum can
    assert torch.equal(alone[truncating], ref[truncating])  # pass 1.0 by a rounding error)
    assert not alone[1].any()


def test_inverse_transform_samples_follow_the_weights_and_never_draw_a_masked_token():
    """``sample_categorical`` on unnormalised log-weights with a masked (``-inf``) token, a
    masked last token and a near-zero one: the frequencies follow the weights (chi-square over
    60 000 rows) and a masked token is never drawn."""
    from engine.sampler import sample_categorical

    weights = torch.tensor([3.0, 0.0, 1.0, 2.0, 1e-3, 0.0])
    gen = torch.Generator().manual_seed(7)
    drawn = sample_categorical(weights.log().expand(60_000, 6), gen)
    assert drawn.shape == (60_000,)
    counts = Counter(drawn.tolist())
    assert counts[1] == counts[5] == 0
    live = [0, 2, 3, 4]
    p = (weights / weights.sum())[live]

    def on_live(c: Counter) -> Counter:
        return Counter({j: c[i] for j, i in enumerate(live)})

    assert _chi_square_p(on_live(counts), p, 60_000) > 1e-4
    cool = sample_categorical((weights ** 2).log().expand(60_000, 6), gen)  # power: p² differs
    assert _chi_square_p(on_live(Counter(cool.tolist())), p, 60_000) < 1e-4


def test_a_uniform_at_its_largest_never_draws_past_the_last_live_token(monkeypatch):
    """``sample_weights`` on weights whose last tokens are 0, with the uniform at 1 (past
    ``torch.rand``'s range: the worst a rounding could do to ``u · total``): the draw must be
    the last token with positive weight, never a masked one past it; and at 0, the first."""
    from engine.sampler import sample_weights

    weights = torch.tensor([[0.2, 0.0, 0.7, 0.1, 0.0, 0.0], [1e-300, 0.0, 0.0, 0.0, 0.0, 0.0]],
                           dtype=torch.float64)
    largest = 1.0
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(*shape, largest,
                                                                       dtype=kw["dtype"]))
    assert sample_weights(weights).tolist() == [3, 0]
    smallest = 0.0
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(*shape, smallest,
                                                                       dtype=kw["dtype"]))
    assert sample_weights(torch.tensor([[0.0, 0.0, 0.5, 0.5]])).tolist() == [2]
