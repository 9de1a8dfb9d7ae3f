"""The paged KV cache under pressure and with prefix caching, on the bundled model: a KV budget
four times too small for the offered load (preemption and recompute), and prefix-cache hits,
both giving the text of a roomy, uncached engine token for token."""

from __future__ import annotations

import pytest

from engine.kv_cache import blocks_for, bytes_per_block
from engine.request import SamplingParams
from tests.conftest import run_engine, tokens_of
from tests.model.test_equivalence import PROMPTS

MAX_MODEL_LEN = 128
BLOCK = 16
HEADER = ("# A common header, as a system prompt or few-shot examples would be: it fills several "
          "KV blocks, so later requests find them in the prefix cache.\nimport os\nimport re\n")


def _block_bytes(core) -> int:
    s = core.model.shape
    return bytes_per_block(s.num_layers, BLOCK, s.num_kv_heads, s.head_dim, core.model.dtype)


@pytest.fixture(scope="module")
def prompts(bundled_model, make_core):
    tok = make_core(model=bundled_model, num_speculations=0, max_model_len=MAX_MODEL_LEN).tokenizer
    return [tok.encode(p) for p in PROMPTS * 2]  # 8 sequences


@pytest.mark.parametrize("k", (0, 3))
def test_a_kv_budget_four_times_too_small_preempts_and_loses_nothing(bundled_model, make_core,
                                                                     prompts, k):
    lengths = [60, 40, 70, 50, 65, 45, 55, 30]
    roomy = make_core(model=bundled_model, num_speculations=0, max_model_len=MAX_MODEL_LEN,
                      max_num_seqs=8, enable_prefix_caching=False)
    want = tokens_of(run_engine(roomy, prompts, lengths, ignore_eos=True))
    load = sum(blocks_for(len(p) + n + k + 1, BLOCK) for p, n in zip(prompts, lengths))
    one_seq = blocks_for(MAX_MODEL_LEN + 33, BLOCK)  # what the engine insists on holding
    num_blocks = max(one_seq, load // 4)
    assert num_blocks * 3 < load, (num_blocks, load)
    tight = make_core(model=bundled_model, num_speculations=k, adaptive_speculation=False,
                      exit_layer=4, max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                      block_size=BLOCK, kv_cache_memory_bytes=num_blocks * _block_bytes(roomy))
    assert tight.cache.num_blocks == num_blocks
    outs = run_engine(tight, prompts, lengths, ignore_eos=True)
    assert tokens_of(outs) == want
    assert all(o[-1].finish_reason == "length" for o in outs.values())
    assert tight.scheduler.num_preemptions > 0
    assert tight.scheduler.blocks.num_free_blocks == num_blocks  # every block given back


def test_seeded_sampling_survives_preemption(bundled_model, make_core, prompts):
    sampling = SamplingParams(temperature=0.9, top_p=0.9, seed=11)
    lengths = [60, 40, 70, 50, 65, 45, 55, 30]
    roomy = make_core(model=bundled_model, num_speculations=3, max_model_len=MAX_MODEL_LEN)
    want = tokens_of(run_engine(roomy, prompts, lengths, ignore_eos=True, sampling=sampling))
    tight = make_core(model=bundled_model, num_speculations=3, max_model_len=MAX_MODEL_LEN,
                      kv_cache_memory_bytes=blocks_for(MAX_MODEL_LEN + 33, BLOCK)
                      * _block_bytes(roomy))
    assert tokens_of(run_engine(tight, prompts, lengths, ignore_eos=True,
                                sampling=sampling)) == want
    assert tight.scheduler.num_preemptions > 0


@pytest.mark.parametrize("k", (0, 2))
def test_prefix_cache_hits_give_the_uncached_text(bundled_model, make_core, prompts, k):
    tok = make_core(model=bundled_model, num_speculations=0).tokenizer
    header = tok.encode(HEADER)
    assert len(header) >= 3 * 4
    shared = [header + p for p in prompts[:4]]
    arrivals = [0, 8, 9, 30]  # the first computes the header; later ones find it
    uncached = make_core(model=bundled_model, num_speculations=k, adaptive_speculation=False,
                         exit_layer=4, enable_prefix_caching=False, block_size=4)
    want = tokens_of(run_engine(uncached, shared, 24, arrivals))
    cached = make_core(model=bundled_model, num_speculations=k, adaptive_speculation=False,
                       exit_layer=4, enable_prefix_caching=True, block_size=4)
    outs = run_engine(cached, shared, 24, arrivals)
    assert tokens_of(outs) == want
    hits = [o[-1].num_cached_tokens for o in outs.values()]
    assert hits[0] == 0 and all(h >= len(header) // 4 * 4 for h in hits[1:]), hits
    assert all(h % 4 == 0 for h in hits)
    blocks = cached.scheduler.blocks
    assert blocks.num_hit_tokens == sum(hits) and blocks.num_queried_tokens >= sum(map(len, shared))
    # The same prompt again: all but its last block-or-token comes from the cache.
    again = run_engine(cached, shared[:1], 24)
    assert tokens_of(again)["r0"] == want["r0"]
    assert again["r0"][-1].num_cached_tokens == (len(shared[0]) - 1) // 4 * 4


def test_cached_blocks_are_evicted_least_recently_used_first(bundled_model, make_core, prompts):
    """A cache that holds one max_model_len sequence: later prompts evict earlier prefixes, and
    every request still gets the uncached text."""
    core = make_core(model=bundled_model, num_speculations=2, max_model_len=MAX_MODEL_LEN,
                     max_num_seqs=2, block_size=BLOCK)
    small = make_core(model=bundled_model, num_speculations=2, max_model_len=MAX_MODEL_LEN,
                      max_num_seqs=2, block_size=BLOCK, enable_prefix_caching=True,
                      kv_cache_memory_bytes=blocks_for(MAX_MODEL_LEN + 33, BLOCK)
                      * _block_bytes(core))
    want = tokens_of(run_engine(core, prompts, 20))
    assert tokens_of(run_engine(small, prompts, 20)) == want
    assert tokens_of(run_engine(small, prompts, 20)) == want  # now partly from the cache
    assert small.scheduler.blocks.num_hit_tokens > 0


def test_start_up_refuses_a_budget_below_one_sequence(bundled_model, make_core):
    core = make_core(model=bundled_model, num_speculations=0, max_model_len=MAX_MODEL_LEN)
    with pytest.raises(ValueError, match="kv-cache-memory-bytes"):
        make_core(model=bundled_model, num_speculations=0, max_model_len=MAX_MODEL_LEN,
                  kv_cache_memory_bytes=_block_bytes(core))
    # The default budget is what max_num_seqs sequences of max_model_len need, not more.
    need = core.config.max_num_seqs * blocks_for(MAX_MODEL_LEN + 33, BLOCK)
    assert core.cache.num_blocks == need and core.cache.nbytes == need * _block_bytes(core)


def test_a_rounds_draft_layers_gathered_once_give_the_per_call_gathers_results(tiny_model):
    """``engine.kv_cache.RoundKV``: a batch on the gather path (shuffled blocks, rows of different
    lengths) runs a round's draft calls (layers ``[0, E)``, one token per row at successive
    positions) reading one gathered copy per layer; hidden states and the pool's KV equal the
    ordinary per-call gather's exactly, and a second round reuses the buffers."""
    import torch

    from engine.kv_cache import RoundKV
    from models.loader import load_checkpoint
    from tests.conftest import make_cache, tables

    m = load_checkpoint(tiny_model, "cpu", "float32", rope_len=64).model
    E, k, lengths = 2, 3, [9, 21, 14]
    results = []
    for shared in (False, True):
        torch.manual_seed(0)
        cache, block_tables = make_cache(m, len(lengths), 32)
        for layer in range(m.num_layers):  # stale or earlier KV everywhere: random
            cache.k[layer].normal_()
            cache.v[layer].normal_()
        t = tables(cache, block_tables)
        base = torch.tensor(lengths)[:, None]
        scratch: dict = {}
        states = []
        for round_start in (0, k + 1):  # two rounds: the second reuses the buffers
            view = (RoundKV(cache, t, max(lengths) + round_start + k + 1, range(E), scratch)
                    if shared else cache)
            tok = torch.tensor([[3], [5], [7]])
            for i in range(k + 1):
                pos = base + round_start + i
                batch = m.attention_batch(t, pos, int(pos.max()) + 1)
                h = m.forward_layers(m.embed(tok), 0, E, view, batch)  # (B, 1, D)
                states.append(h)
                tok = m.logits(h).argmax(-1)
            if shared and round_start == 0:
                buffers = {key: buf.data_ptr() for key, buf in scratch.items()}
        if shared:
            assert len(scratch) == 2 * E
            assert {key: buf.data_ptr() for key, buf in scratch.items()} == buffers
        results.append((torch.cat(states, 1), [x.clone() for x in cache.k[:E] + cache.v[:E]]))
    (want, want_kv), (got, got_kv) = results
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_kv, want_kv))
