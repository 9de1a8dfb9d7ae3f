"""Our forward against ``transformers.LlamaForCausalLM`` on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from models.loader import CheckpointError, load_checkpoint
from tests.conftest import make_cache, make_tiny_checkpoint, tables

TOL = 1e-4


def _ours_prefill_then_decode(model, ids: torch.Tensor, split: int, exit_layer: int) -> torch.Tensor:
    """Logits of every position: prefill ``ids[:split]`` in one call, then one token per call,
    each decode call running layers ``[0, E)`` and ``[E, L)`` separately."""
    s, T = model.shape, ids.shape[1]
    cache, block_tables = make_cache(model, 3, T + 4)  # shuffled blocks: the gather path
    row = tables(cache, block_tables[2:])
    batch = model.attention_batch(row, torch.arange(split)[None], split)
    logits = [model.logits(model.forward_layers(model.embed(ids[:, :split]), 0, s.num_layers,
                                                cache, batch))]
    for t in range(split, T):
        batch = model.attention_batch(row, torch.tensor([[t]]), t + 1)
        h = model.forward_layers(model.embed(ids[:, t:t + 1]), 0, exit_layer, cache, batch)
        logits.append(model.logits(model.forward_layers(h, exit_layer, s.num_layers, cache, batch)))
    return torch.cat(logits, 1)


def _compare(folder: str, exit_layer: int) -> None:
    ck = load_checkpoint(folder, "cpu", "float32")
    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, ck.model.shape.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(ids).logits
        got = _ours_prefill_then_decode(ck.model, ids, 20, exit_layer)
    err = (got - expected).abs().max().item()
    assert err < TOL, f"max |logit difference| {err:.2e} >= {TOL}"


def test_tiny_random_config_matches_transformers(tiny_model):
    _compare(tiny_model, exit_layer=2)


def test_tiny_llama3_rope_and_mha_matches_transformers(tmp_path):
    folder = make_tiny_checkpoint(
        tmp_path, num_layers=3, hidden=64, heads=4, kv_heads=4,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})
    _compare(folder, exit_layer=1)


def test_bundled_model_matches_transformers(bundled_model):
    _compare(bundled_model, exit_layer=4)


def test_missing_file_is_named(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(folder)


def test_unsupported_architecture_is_named(tiny_model, tmp_path):
    import json
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'"):
        load_checkpoint(folder)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_stays_close_to_float32(tiny_model, make_core, dtype):
    """The CUDA default (bf16) and fp16 run the same code; on the CPU they load, cast every weight
    and the KV cache, and their logits stay near fp32's."""
    full = load_checkpoint(tiny_model, "cpu", "float32").model
    half = load_checkpoint(tiny_model, "cpu", dtype).model
    assert half.dtype == getattr(torch, dtype) and half.layers[0]["qkv"].dtype == half.dtype
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = _ours_prefill_then_decode(full, ids, 8, 2)
        got = _ours_prefill_then_decode(half, ids, 8, 2)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    core = make_core(model=tiny_model, dtype=dtype, exit_layer=2, num_speculations=3,
                     adaptive_speculation=False)
    assert core.cache.k[0].dtype == getattr(torch, dtype)
    from tests.conftest import run_engine, tokens_of

    out = tokens_of(run_engine(core, [[5, 6, 7, 8]], 12, ignore_eos=True))["r0"]
    assert len(out) == 12 and all(0 <= t < 4096 for t in out)
