"""Sampling stays lossless under self-speculation.

(a) With the draft set to the full model (E = L) every draft is accepted, under greedy decoding,
rejection sampling and seeded (coupled) sampling, with penalties and truncation on.
(b) A statistical test on a tiny random model: for a fixed prompt, the first generated tokens
under self-speculative sampling (rejection sampling, k = 3) follow the same distribution as plain
sampling. 10 000 samples per arm; a two-sample chi-square homogeneity test per position and for
pairs of positions, cells with fewer than 10 pooled samples lumped together; each test must give
p > 1e-4. The runs are seeded, so the result is deterministic; a power check shows the same test
tells temperature 1.0 from 0.9 apart.
(c) Seeded requests give the same tokens alone, inside a batch of other requests, and with
speculation on or off.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.request import EngineRequest, SamplingParams
from models.loader import BUNDLED_MODEL
from tests.conftest import make_tiny_checkpoint, run_engine, scripted_plan, tokens_of

COUNTS = str(BUNDLED_MODEL / "draft_vocab.json")  # a frequency ranking for the draft head

PROMPT = (5, 17, 42)
NUM_SAMPLES = 10_000
MAX_TOKENS = 5  # after the prefill's token, room for one k = 3 round and more
P_VALUE_THRESHOLD = 1e-4
CONFIGS = {
    "t0.5": SamplingParams(temperature=0.5),
    "t1.0": SamplingParams(temperature=1.0),
    "t0.8-top_p0.9-penalties": SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.5,
                                              repetition_penalty=1.2),
}


@pytest.fixture(scope="module")
def peaky_model(tmp_path_factory) -> str:
    """A tiny random model with sharper next-token distributions (entropy ~1.5 nats at T=0.5)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("peaky"), init_std=0.5)


def _sample(core, params: SamplingParams, n: int = NUM_SAMPLES):
    """``n`` samples of the first ``MAX_TOKENS`` tokens; also the drafted and accepted totals."""
    for i in range(n):
        core.add_request(EngineRequest(f"s{i}", PROMPT, MAX_TOKENS, ignore_eos=True, sampling=params))
    tokens: dict[str, list[int]] = {}
    drafted = accepted = 0
    while core.has_work():
        for out in core.step()[0]:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                drafted += out.num_draft_tokens
                accepted += out.num_accepted_tokens
    return [tuple(tokens[f"s{i}"]) for i in range(n)], drafted, accepted


def homogeneity_p_value(a: list, b: list, min_cell: int = 10) -> float:
    """Two-sample chi-square test that ``a`` and ``b`` (equal sizes) share one distribution."""
    assert len(a) == len(b)
    ca, cb = Counter(a), Counter(b)
    big = [v for v in set(ca) | set(cb) if ca[v] + cb[v] >= min_cell]
    cells = [(ca[v], cb[v]) for v in big]
    rest = (len(a) - sum(x for x, _ in cells), len(b) - sum(y for _, y in cells))
    if sum(rest):
        cells.append(rest)
    stat = sum((x - y) ** 2 / (x + y) for x, y in cells)
    df = len(cells) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


def _views(samples):
    """Each position alone, and the pairs of the first round's positions."""
    yield from ((f"token {i + 1}", [s[i] for s in samples]) for i in range(MAX_TOKENS))
    yield from ((f"tokens {i + 1},{i + 2}", [s[i:i + 2] for s in samples]) for i in range(3))


@pytest.fixture(scope="module")
def cores(peaky_model, make_core):
    kw = dict(model=peaky_model, max_num_seqs=64, seed=1)
    return (make_core(num_speculations=0, **kw),
            make_core(exit_layer=3, num_speculations=3, adaptive_speculation=False, **kw),
            scripted_plan(make_core(exit_layer=3, num_speculations=3, draft_token_counts=COUNTS,
                                    draft_vocab_size=1024, **kw)))


_PLAIN: dict[str, list] = {}


def _plain_samples(plain, name: str) -> list:
    """Plain sampling's samples for a config, drawn once per module (the arms that compare
    against them are independent draws)."""
    if name not in _PLAIN:
        _PLAIN[name] = _sample(plain, CONFIGS[name])[0]
    return _PLAIN[name]


@pytest.mark.parametrize("name", [*CONFIGS, "t1.0-switching-k", "t0.8-top_p0.9-penalties-switching-k"])
def test_speculative_sampling_matches_plain_sampling(cores, name):
    """Rejection sampling at k = 3; and with each row's k drawn from 0..3 every round and a
    draft head truncated to 1024 of the 4096 tokens (FR-Spec)."""
    plain, spec, switching = cores
    if name.endswith("-switching-k"):
        name, spec = name.removesuffix("-switching-k"), switching
    params = CONFIGS[name]
    expected = _plain_samples(plain, name)
    got, drafted, accepted = _sample(spec, params)
    assert 0.05 < accepted / drafted < 0.95, "both acceptance and rejection must be exercised"
    report = {view: homogeneity_p_value(e, g)
              for (view, e), (_, g) in zip(_views(expected), _views(got))}
    assert min(report.values()) > P_VALUE_THRESHOLD, report


def test_chi_square_has_power(cores):
    """The same test, on plain sampling at temperature 1.0 against 0.9, must reject."""
    plain = cores[0]
    hot = _plain_samples(plain, "t1.0")
    cool, _, _ = _sample(plain, SamplingParams(temperature=0.9))
    assert homogeneity_p_value([s[0] for s in hot], [s[0] for s in cool]) < P_VALUE_THRESHOLD


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.7),
    SamplingParams(temperature=1.0, top_p=0.9, top_k=50, frequency_penalty=1.0),
    SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.2, min_p=0.05),
], ids=["greedy", "rejection", "seeded"])
def test_full_model_draft_accepts_everything(make_core, tiny_model, params):
    core = make_core(model=tiny_model, exit_layer=4, num_speculations=3, adaptive_speculation=False)
    outs = run_engine(core, [list(PROMPT), [7, 8, 9, 10, 11]], 40, ignore_eos=True, sampling=params)
    for rid, o in outs.items():
        assert o[-1].num_draft_tokens > 0
        assert o[-1].num_accepted_tokens == o[-1].num_draft_tokens, rid


def _seeded(seed, **kw):
    return SamplingParams(temperature=0.9, top_p=0.95, seed=seed, presence_penalty=0.3, **kw)


def _run_mixed(core, prompts, alone_seed):
    requests = [EngineRequest(f"seeded{i}", tuple(p), 24, ignore_eos=True, sampling=_seeded(alone_seed))
                for i, p in enumerate(prompts)]
    requests += [EngineRequest(f"free{i}", tuple(p[::-1]), 30, ignore_eos=True,
                               sampling=SamplingParams(temperature=1.0)) for i, p in enumerate(prompts)]
    arrivals = [3, 0, 5, 0, 1, 2]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    step = 0
    while step <= max(arrivals) or core.has_work():
        for r, at in zip(requests, arrivals):
            if at == step:
                core.add_request(r)
        for out in core.step()[0] if core.has_work() else []:
            tokens[out.request_id].extend(out.token_ids)
        step += 1
    assert tokens["free0"] != tokens["seeded0"]
    return tokens


def test_seeded_requests_are_reproducible_in_any_batch_and_with_speculation(make_core, tiny_model):
    prompts = [list(PROMPT), [100, 200, 300, 400], [9] * 7]
    plain = make_core(model=tiny_model, num_speculations=0, max_num_seqs=4)
    spec = make_core(model=tiny_model, exit_layer=2, num_speculations=3, max_num_seqs=4,
                     adaptive_speculation=False)
    switching = scripted_plan(make_core(model=tiny_model, exit_layer=2, num_speculations=3,
                                        max_num_seqs=4, draft_token_counts=COUNTS,
                                        draft_vocab_size=512))
    alone = [tokens_of(run_engine(plain, [p], 24, ignore_eos=True, sampling=_seeded(11)))["r0"]
             for p in prompts]
    for core in (plain, spec, switching):
        for p, expected in zip(prompts, alone):
            single = tokens_of(run_engine(core, [p], 24, ignore_eos=True, sampling=_seeded(11)))
            assert single["r0"] == expected
        # The seeded requests share their batch with unseeded ones, arriving at other steps.
        mixed = _run_mixed(core, prompts, alone_seed=11)
        assert [mixed[f"seeded{i}"] for i in range(3)] == alone
    other_seed = tokens_of(run_engine(plain, prompts[:1], 24, ignore_eos=True,
                                      sampling=_seeded(12)))["r0"]
    assert other_seed != alone[0]


def test_a_truncated_draft_head_proposes_only_its_tokens_with_q_renormalised(make_core, tiny_model):
    core = make_core(model=tiny_model, draft_token_counts=COUNTS, draft_vocab_size=300)
    m = core.model
    ids = m.draft_ids
    assert core.draft_vocab_size == len(ids) >= 300 and 0 in ids.tolist()  # EOS is kept
    hidden = torch.randn(3, 2, m.shape.hidden_size)
    full = m.logits(hidden)  # (3, 2, V)
    q = m.draft_full_logits(hidden).softmax(-1)
    outside = torch.ones(m.shape.vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert torch.all(q[..., outside] == 0)
    expected = full[..., ids].softmax(-1)  # the full head's softmax over the subset only
    assert torch.allclose(q[..., ids], expected, atol=1e-6)
    assert torch.equal(m.draft_argmax(hidden), ids[full[..., ids].argmax(-1)])
