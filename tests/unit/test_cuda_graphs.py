"""The CUDA-graph path's padding and bucketing, on the CPU (``engine.cuda_graphs``).

The graph path runs the same :func:`engine.cuda_graphs.forward_call` as the eager one, on static
buffers padded to a batch bucket and a key bucket; with ``capture=False`` it runs that function
eagerly on those buffers, which is what these tests drive: a padded row never changes another
row's tokens, padding rows write only to the scratch block, and greedy output through the padded
path equals the eager engine's token for token.
"""

from __future__ import annotations

import pytest
import torch

from engine.cuda_graphs import GraphRunner, batch_buckets, bucket_for, key_buckets
from engine.kv_cache import KVCache
from engine.spec_decode import SpecDecodeRunner
from models.loader import load_checkpoint
from tests.conftest import run_engine, tokens_of
from tests.model.test_equivalence import ARRIVALS, PROMPTS


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert key_buckets(1000, 16) == [256, 512, 1008]
    assert key_buckets(100, 16, smallest=8) == [16, 32, 64, 112]  # whole blocks
    assert bucket_for(3, [1, 2, 4]) == 4 and bucket_for(5, [1, 2, 4]) is None


def test_a_cache_without_a_scratch_block_is_refused(tiny_model):
    model = load_checkpoint(tiny_model, "cpu", "float32").model
    s = model.shape
    cache = KVCache(s.num_layers, 8, 4, s.num_kv_heads, s.head_dim, model.dtype, "cpu")
    with pytest.raises(ValueError, match="scratch block"):
        GraphRunner(model, cache, 4, 32, 3)


def _runner_pair(model, num_blocks: int, block_size: int = 4, capture: bool = False,
                 k: int = 3, exit_layer: int = 2):
    """Two runners over identical zeroed caches with a scratch block: eager, and padded (with
    ``capture``, on CUDA, its graphs captured for ``exit_layer`` and ``1..k``)."""
    s = model.shape

    def cache():
        return KVCache(s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim,
                       model.dtype, model.device, scratch_block=True)

    eager, padded_cache = SpecDecodeRunner(model, cache()), cache()
    graphs = GraphRunner(model, padded_cache, 4, 64, 4, capture, smallest_key_bucket=8)
    graphs.capture(exit_layer, list(range(1, k + 1)))
    return eager, SpecDecodeRunner(model, padded_cache, graphs)


@pytest.mark.parametrize("k", (0, 3))
def test_padding_rows_write_only_the_scratch_block_and_change_no_row(tiny_model, k,
                                                                     device="cpu"):
    """Three rows padded to four, keys padded to a 16-token bucket: the round's tokens equal the
    unpadded round's, and every block outside the rows' tables but the scratch one stays zero.
    (``tests/model/test_cuda.py`` runs it on CUDA with captured graphs.)"""
    model = load_checkpoint(tiny_model, device, "float32").model
    eager, padded = _runner_pair(model, num_blocks=12, capture=device != "cpu", k=max(k, 1))
    if device != "cpu":
        assert padded.graphs.graphs, "no graph was captured"
    tables = [[3, 7], [1, 9, 4], [10, 5]]  # scrambled, of different lengths
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23]]
    for runner in (eager, padded):
        for prompt, table in zip(prompts, tables):
            runner.prefill([prompt], [table])
    rounds = [runner.decode_round(tables, [1, 2, 3], [len(p) for p in prompts], 2, k)
              for runner in (eager, padded)]
    assert rounds[0].tokens == rounds[1].tokens
    assert padded.graphs.key_sizes[:2] == [8, 16]
    owned = {b for t in tables for b in t}
    scratch = padded.cache.scratch_block  # (a padding row's verify input is zeros: zero KV)
    assert padded.cache.k[0][scratch].any(), "padding rows should write their KV to scratch"
    for layer in range(model.num_layers):
        k_pool = padded.cache.k[layer]
        untouched = [b for b in range(padded.cache.num_blocks) if b not in owned]
        assert not k_pool[untouched].any(), "a padding row wrote outside the scratch block"
        # the rows' own KV agrees to rounding (a (4, T) product rounds unlike a (3, T) one)
        torch.testing.assert_close(k_pool[sorted(owned)], eager.cache.k[layer][sorted(owned)],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", (0, 2))
def test_the_padded_path_gives_the_eager_engine_s_tokens(bundled_model, make_core, k):
    """The bundled model, four prompts of different lengths arriving at different steps (batch
    sizes 1 to 3, padded to 1, 2 and 4), blocks of 4 tokens, key buckets from 8 tokens: greedy
    output through the padded buffers equals the eager engine's token for token."""
    kwargs = dict(model=bundled_model, exit_layer=4, num_speculations=k,
                  adaptive_speculation=False, max_num_seqs=3, block_size=4, max_model_len=96)
    eager = make_core(**kwargs)
    prompts = [eager.tokenizer.encode(p) for p in PROMPTS]
    want = tokens_of(run_engine(eager, prompts, 24, ARRIVALS))
    core = make_core(**kwargs)
    s, cache = core.model.shape, core.cache
    core.cache = core.runner.cache = KVCache(s.num_layers, cache.num_blocks, 4, s.num_kv_heads,
                                             s.head_dim, core.model.dtype, "cpu",
                                             scratch_block=True)
    graphs = GraphRunner(core.model, core.cache, 4, 96 + 33, k + 1, smallest_key_bucket=8)
    core.runner.graphs = graphs
    calls = []
    real_begin = graphs.begin_round
    graphs.begin_round = lambda tables, n: calls.append(len(tables)) or real_begin(tables, n)
    assert tokens_of(run_engine(core, prompts, 24, ARRIVALS)) == want
    assert 3 in calls and 1 in calls, calls  # a padded batch of three, and a single sequence


def test_enforce_eager_flag_and_env_twin_and_no_graphs_on_the_cpu(tiny_model, make_core):
    from server.cli import engine_config, parse_args

    assert not engine_config(parse_args([], environ={})).enforce_eager
    assert engine_config(parse_args(["--enforce-eager"], environ={})).enforce_eager
    assert engine_config(parse_args([], environ={"LAYERSKIP_ENFORCE_EAGER": "1"})).enforce_eager
    core = make_core(model=tiny_model, enforce_eager=False)  # the CPU: graphs always off
    assert core.runner.graphs is None and core.cache.scratch_block is None
