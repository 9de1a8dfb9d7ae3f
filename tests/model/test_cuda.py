"""The model and engine invariants on CUDA (``python -m pytest -m cuda``; skipped without CUDA).

- our forward against transformers' logits on the same weights (fp32 on CUDA, both on the GPU);
- greedy self-speculative output equals plain decoding: fp32 token for token; bf16 with one
  allowance, a divergence only where plain decoding's top-2 logit gap is below
  :data:`BF16_TIE_GAP` (a rounding near-tie between a 1-token and a (k+1)-token call), the gap
  printed either way;
- sampling stays lossless: the chi-square homogeneity test of ``test_sampling``, fewer samples;
- CUDA graphs on and off (``enforce_eager``) give the same tokens.

Each test uses the CPU suites' helpers, so the two cannot drift apart.
"""

from __future__ import annotations

import pytest
import torch

from engine.request import SamplingParams
from tests.conftest import make_cache, make_tiny_checkpoint, run_engine, tables, tokens_of
from tests.model.test_equivalence import ARRIVALS, PROMPTS
from tests.model.test_llama_reference import _ours_prefill_then_decode
from tests.model.test_sampling import P_VALUE_THRESHOLD, _sample, _views, homogeneity_p_value

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA_TOL = 1e-3  # fp32 on CUDA: SDPA's fused kernels sum in another order than the CPU's
BF16_TIE_GAP = 1e-3
MAX_TOKENS = 32


def test_forward_matches_transformers_on_cuda(bundled_model, tiny_model):
    from transformers import LlamaForCausalLM

    from models.loader import load_checkpoint

    for folder, exit_layer in ((tiny_model, 2), (bundled_model, 4)):
        ck = load_checkpoint(folder, "cuda", "float32")
        ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
        ids = torch.randint(0, ck.model.shape.vocab_size, (1, 48),
                            generator=torch.Generator().manual_seed(1)).cuda()
        with torch.inference_mode():
            err = (_ours_prefill_then_decode(ck.model, ids, 20, exit_layer)
                   - ref(ids).logits).abs().max().item()
        assert err < CUDA_TOL, f"{folder}: max |logit difference| {err:.2e}"


@pytest.mark.parametrize("k", (0, 3))
def test_captured_padding_rows_write_only_the_scratch_block(tiny_model, k):
    """The CPU padding test, with the graphs captured and replayed."""
    from tests.unit.test_cuda_graphs import (
        test_padding_rows_write_only_the_scratch_block_and_change_no_row as padding_test)

    padding_test(tiny_model, k, device="cuda")


def _top2_gap(core, prompt: list[int], prefix: list[int]) -> float:
    """Plain decoding's top-2 logit gap for the token after ``prompt + prefix`` (one prefill)."""
    m = core.model
    ids = torch.tensor([prompt + prefix], device=m.device)
    cache, block_tables = make_cache(m, 1, ids.shape[1])
    batch = m.attention_batch(tables(cache, block_tables),
                              torch.arange(ids.shape[1], device=m.device)[None], ids.shape[1])
    with torch.inference_mode():
        logits = m.logits(m.forward_layers(m.embed(ids), 0, m.num_layers, cache, batch))[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def _check(plain, prompts, expected: dict, got: dict, tie_gap: float | None) -> None:
    """Token for token; with ``tie_gap``, a first divergence is allowed where plain decoding's
    top-2 gap is below it (the gap is printed for every divergence)."""
    for rid, want in expected.items():
        if got[rid] == want:
            continue
        i = next((i for i, (a, b) in enumerate(zip(want, got[rid])) if a != b),
                 min(len(want), len(got[rid])))
        gap = _top2_gap(plain, prompts[int(rid[1:])], want[:i])
        print(f"{rid}: first divergence at output token {i}, plain top-2 gap {gap:.3e}")
        assert tie_gap is not None and gap < tie_gap, (
            f"{rid}: diverges at output token {i} where plain's top-2 gap is {gap:.3e}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_speculation_matches_plain_decoding_on_cuda(bundled_model, make_core, dtype):
    kw = dict(model=bundled_model, device="cuda", dtype=dtype, max_num_seqs=4)
    plain = make_core(num_speculations=0, **kw)
    prompts = [plain.tokenizer.encode(p) for p in PROMPTS]
    single = tokens_of(run_engine(plain, prompts[:1], MAX_TOKENS))
    mixed = tokens_of(run_engine(plain, prompts, MAX_TOKENS, ARRIVALS))
    gap = None if dtype == "float32" else BF16_TIE_GAP
    for exit_layer, k in ((2, 1), (4, 2), (4, 4), (8, 3)):
        core = make_core(exit_layer=exit_layer, num_speculations=k, adaptive_speculation=False,
                         **kw)
        assert core.runner.graphs is not None and core.runner.graphs.graphs
        _check(plain, prompts, single, tokens_of(run_engine(core, prompts[:1], MAX_TOKENS)), gap)
        _check(plain, prompts, mixed,
               tokens_of(run_engine(core, prompts, MAX_TOKENS, ARRIVALS)), gap)


@pytest.mark.parametrize("k", (2, 0))
def test_graphs_on_and_off_give_the_same_tokens(bundled_model, make_core, k):
    kw = dict(model=bundled_model, device="cuda", dtype="float32", max_num_seqs=4,
              exit_layer=4, num_speculations=k, adaptive_speculation=False)
    eager, graphed = make_core(enforce_eager=True, **kw), make_core(**kw)
    assert eager.runner.graphs is None and graphed.runner.graphs.graphs
    prompts = [eager.tokenizer.encode(p) for p in PROMPTS]
    want = tokens_of(run_engine(eager, prompts, MAX_TOKENS, ARRIVALS))
    assert tokens_of(run_engine(graphed, prompts, MAX_TOKENS, ARRIVALS)) == want


def test_speculative_sampling_matches_plain_sampling_on_cuda(tmp_path_factory, make_core):
    """``test_sampling``'s chi-square test at temperature 1.0, k = 3, 3 000 samples an arm."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("peaky-cuda"), init_std=0.5)
    kw = dict(model=folder, device="cuda", max_num_seqs=64, seed=1)
    plain = make_core(num_speculations=0, **kw)
    spec = make_core(exit_layer=3, num_speculations=3, adaptive_speculation=False, **kw)
    params = SamplingParams(temperature=1.0)
    expected = _sample(plain, params, 3000)[0]
    got, drafted, accepted = _sample(spec, params, 3000)
    assert 0.05 < accepted / drafted < 0.95
    report = {view: homogeneity_p_value(e, g)
              for (view, e), (_, g) in zip(_views(expected), _views(got))}
    print(report)
    assert min(report.values()) > P_VALUE_THRESHOLD, report
