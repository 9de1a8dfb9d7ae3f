"""Chunked prefill under one token budget: the output never depends on how prompts are cut.

Greedy self-speculation with prompts prefilled in chunks of every size from 1 token up to the
whole prompt equals plain decoding with whole prompts, token for token; all prefill chunks of a
step run in one packed forward call; and the packed call's hidden states match row-by-row calls.
"""

from __future__ import annotations

import pytest
import torch

from engine.request import SamplingParams
from tests.conftest import make_cache, run_engine, tables, tokens_of
from tests.model.test_equivalence import ARRIVALS, PROMPTS

MAX_TOKENS = 20


@pytest.fixture(scope="module")
def expected(bundled_model, make_core):
    plain = make_core(model=bundled_model, num_speculations=0, max_num_seqs=4)
    prompts = [plain.tokenizer.encode(p) for p in PROMPTS]
    return prompts, tokens_of(run_engine(plain, prompts, MAX_TOKENS, ARRIVALS))


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8, 13, 21, 64])
def test_every_chunk_size_matches_whole_prompt_plain_decoding(expected, make_core, bundled_model,
                                                              budget):
    prompts, want = expected
    assert max(len(p) for p in prompts) < 64  # the largest budget prefills every prompt whole
    for k in (0, 3):
        core = make_core(model=bundled_model, num_speculations=k, adaptive_speculation=False,
                         exit_layer=4, max_num_seqs=4, max_num_batched_tokens=budget,
                         block_size=4)  # chunks start and end inside and across blocks
        calls = []
        real = core.runner.prefill_chunks
        core.runner.prefill_chunks = lambda chunks, *a, **kw: (calls.append([len(c) for c in chunks]),
                                                               real(chunks, *a, **kw))[1]
        assert tokens_of(run_engine(core, prompts, MAX_TOKENS, ARRIVALS)) == want, (budget, k)
        assert sum(map(sum, calls)) == sum(len(p) for p in prompts)  # each prompt token once
        assert all(sum(c) <= budget for c in calls), calls  # decoding first, prefill the rest


def test_seeded_sampling_does_not_depend_on_chunking(bundled_model, make_core):
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    outs = []
    for budget in (2048, 4):
        core = make_core(model=bundled_model, num_speculations=3, max_num_seqs=4,
                         max_num_batched_tokens=budget)
        prompts = [core.tokenizer.encode(p) for p in PROMPTS]
        outs.append(tokens_of(run_engine(core, prompts, MAX_TOKENS, ARRIVALS, sampling=sampling)))
    assert outs[0] == outs[1]


def test_a_packed_call_matches_one_call_per_row(bundled_model, make_core):
    """Rows of different lengths and starts, packed into one (1, T) call, give the hidden states
    and KV of separate per-row calls."""
    core = make_core(model=bundled_model, num_speculations=0, max_num_seqs=3)
    m, s = core.model, core.model.shape
    prompts = [core.tokenizer.encode(p) for p in PROMPTS[:3]]
    starts = [0, 5, 2]

    def cache():
        return make_cache(m, 3, 64)

    def keys(c, table, n):  # (n, KV, hd): a sequence's first n positions of the last layer
        return c.k[-1][table].reshape(-1, s.num_kv_heads, s.head_dim)[:n]

    with torch.inference_mode():
        (separate, sep_tables), (packed, pk_tables) = cache(), cache()
        want = []
        for row, p in enumerate(prompts):
            # positions before the chunk first, as an earlier chunk would have left them
            ids = torch.tensor([p])
            b = m.attention_batch(tables(separate, sep_tables[row:row + 1]),
                                  torch.arange(len(p))[None], len(p))
            want.append(m.forward_layers(m.embed(ids), 0, s.num_layers, separate, b)[0])
            if starts[row]:
                head = torch.tensor([p[:starts[row]]])
                b = m.attention_batch(tables(packed, pk_tables[row:row + 1]),
                                      torch.arange(starts[row])[None], starts[row])
                m.forward_layers(m.embed(head), 0, s.num_layers, packed, b)
        tails = [p[st:] for p, st in zip(prompts, starts)]
        ids = torch.tensor([t for c in tails for t in c])[None]
        batch = m.packed_attention_batch(tables(packed, pk_tables), [len(c) for c in tails],
                                         starts)
        got = m.forward_layers(m.embed(ids), 0, s.num_layers, packed, batch)[0]
    offset = 0
    for row, (p, st) in enumerate(zip(prompts, starts)):
        n = len(p) - st
        torch.testing.assert_close(got[offset:offset + n], want[row][st:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(keys(packed, pk_tables[row], len(p)),
                                   keys(separate, sep_tables[row], len(p)), atol=1e-4, rtol=1e-4)
        offset += n
