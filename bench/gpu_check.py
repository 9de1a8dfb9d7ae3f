"""One command that measures a GPU the moment one is available (at most 8 minutes on one H200).

    python bench/gpu_check.py                      # on CUDA: tests, speedups, roofline
    python bench/gpu_check.py --device cpu --quick # the same code paths on the CPU, < 3 minutes

1. **The CUDA tests** (``python -m pytest -m cuda tests/model/test_cuda.py``; on the CPU they
   all skip, and the run only proves the command works).
2. **The speedup benchmark** on the bundled model (``bench/speedup.py``'s own functions), greedy,
   at batch 1, 8 and 32, eager (``enforce_eager``) and graphed.
3. **A throughput/roofline run** on random-initialised Llamas of Llama-3.2-1B's and Llama-2-7B's
   shapes (bf16 on CUDA; no weights are downloaded; ``--quick`` uses tiny stand-ins of the same
   depth): plain decode tokens/s at batch 1 against the bound ``HBM bandwidth / bytes read per
   token`` (every weight once, plus the KV read), eager and graphed; the measured cost of a draft
   step at ``E = L/4`` and of a verify call over ``k + 1`` tokens; the ideal self-speculative
   speedup at the acceptance rates of :data:`ACCEPTANCE_RATES`; and which SDPA kernel the
   decode and verify shapes get (``torch._fused_sdp_choice``).

Writes ``gpu-check-<device>[-quick].json`` under ``bench/results/`` (or ``--out DIR``) and prints
a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import speedup  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.cuda_graphs import GraphRunner  # noqa: E402
from engine.kv_cache import KVCache, blocks_for  # noqa: E402
from engine.spec_decode import SpecDecodeRunner  # noqa: E402
from engine.speculation import expected_tokens  # noqa: E402
from models.llama import LlamaModel  # noqa: E402
from models.loader import BUNDLED_MODEL, _shape, rope_tables  # noqa: E402

H200_HBM_BYTES_PER_S = 4.8e12
"""H200 HBM3e bandwidth, 4.8 TB/s (NVIDIA H200 Tensor Core GPU datasheet,
https://www.nvidia.com/en-us/data-center/h200/)."""

ACCEPTANCE_RATES = (0.6, 0.7, 0.8)
"""Per-token acceptance rates the ideal speedup is printed at. LayerSkip (Elhoushi et al. 2024,
arXiv 2404.16710, §6 "Self-speculative decoding" tables) reports per-task token acceptance for
its continually pretrained Llama2/Llama3 checkpoints; this session could not retrieve those
tables (no copy of the paper among the stored sources), so these are placeholders spanning the
range such trained early exits reach, not the paper's figures: replace them with its table rows
(task, model, E, acceptance) when it is at hand."""

SHAPES = {  # the published configs' dimensions (Hugging Face config.json of each model)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       tie_word_embeddings=False),
}
QUICK_SHAPES = {  # CPU stand-ins: the same depth and head layout, small widths
    "llama-3.2-1b": dict(SHAPES["llama-3.2-1b"], hidden_size=128, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                         vocab_size=4096),
    "llama-2-7b": dict(SHAPES["llama-2-7b"], hidden_size=128, intermediate_size=344,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=4096),
}


def run_cuda_tests() -> dict:
    """``python -m pytest -m cuda`` on the CUDA tests; their exit code and summary line."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider", str(ROOT / "tests" / "model" / "test_cuda.py")],
                          capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
            "seconds": time.perf_counter() - start,
            "output_tail": proc.stdout[-4000:] if proc.returncode else ""}


def speedup_rows(device: str, quick: bool) -> list[dict]:
    """``bench/speedup.py``'s greedy plain-vs-speculative pair on the bundled model, per batch
    size, eager and graphed (one repeat each: the window is short)."""
    batches, prompt_tokens, max_tokens = ((1, 2), 32, 8) if quick else ((1, 8, 32), 128, 128)
    probe = speedup.EngineCore(EngineConfig(model=str(BUNDLED_MODEL), num_speculations=0,
                                            max_num_seqs=1))
    rows = []
    for b in batches:
        prompts = speedup.make_prompts(probe.tokenizer, "test", b if quick else max(b, 8),
                                       prompt_tokens)
        args = argparse.Namespace(repeats=1, max_tokens=max_tokens, batch_size=b)
        for eager in (True, False):
            config = EngineConfig(model=str(BUNDLED_MODEL), device=device, max_num_seqs=b,
                                  max_model_len=prompt_tokens + max_tokens, enforce_eager=eager)
            r = speedup.measure(config, prompts, args, 0.0)
            rows.append({"batch_size": b, "enforce_eager": eager, **{
                key: r[key] for key in ("plain_tokens_per_second", "spec_tokens_per_second",
                                        "speedup", "ideal_speedup", "acceptance_rate",
                                        "greedy_mismatches", "exit_layer", "num_speculations",
                                        "rounds_by_k")}})
            print(f"speedup b={b} {'eager' if eager else 'graphed'}: {r['speedup']:.3f}x "
                  f"({r['plain_tokens_per_second']:.0f} -> {r['spec_tokens_per_second']:.0f} "
                  "tokens/s)", flush=True)
    return rows


def random_llama(dims: dict, device: str, dtype: torch.dtype, max_len: int) -> LlamaModel:
    """A randomly initialised Llama (weights ~ N(0, 0.02), norms 1) of ``dims``."""
    from transformers import LlamaConfig

    config = LlamaConfig(**dims, max_position_embeddings=max(max_len, 8192))
    s = _shape(config)
    D, I, hd = s.hidden_size, config.intermediate_size, s.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def w(*shape):
        return torch.empty(shape, device=device, dtype=dtype).normal_(0, 0.02, generator=gen)

    weights = {"model.embed_tokens.weight": w(s.vocab_size, D),
               "model.norm.weight": torch.ones(D, device=device, dtype=dtype)}
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = w(s.vocab_size, D)
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            weights[p + name + ".weight"] = torch.ones(D, device=device, dtype=dtype)
        for name, out in (("q", s.num_heads * hd), ("k", s.num_kv_heads * hd),
                          ("v", s.num_kv_heads * hd)):
            weights[f"{p}self_attn.{name}_proj.weight"] = w(out, D)
        weights[p + "self_attn.o_proj.weight"] = w(D, s.num_heads * hd)
        weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"] = w(I, D), w(I, D)
        weights[p + "mlp.down_proj.weight"] = w(D, I)
    cos, sin = rope_tables(config, max_len, dtype, device)
    return LlamaModel(s, weights, cos, sin)


def bytes_per_token(model: LlamaModel, context: int) -> int:
    """HBM bytes one batch-1 decode step must read: every layer's weights, the final norm and
    the LM head once (the embedding row is negligible), and ``context`` positions of KV."""
    layers = sum(t.numel() * t.element_size() for layer in model.layers for t in layer.values())
    head = model.lm_head.numel() * model.lm_head.element_size() + model.norm.numel() * 2
    s = model.shape
    kv = 2 * s.num_layers * context * s.num_kv_heads * s.head_dim * model.dtype.itemsize
    return layers + head + kv


def time_rounds(runner: SpecDecodeRunner, table: list[int], context: int, exit_layer: int,
                k: int, iters: int) -> tuple[float, float | None, float | None]:
    """Mean seconds of a batch-1 round at ``context`` (after warm-up), and of its draft step and
    verify call (``k > 0``). Rounds rewrite the same positions, so the context stays fixed."""
    def once():
        return runner.decode_round([table], [1], [context], exit_layer, k)

    for _ in range(3):
        once()
    draft = verify = 0.0
    start = time.perf_counter()
    for _ in range(iters):
        once()
        if k:
            draft, verify = draft + runner.last_timing[0], verify + runner.last_timing[1]
    seconds = (time.perf_counter() - start) / iters
    return seconds, (draft / iters if k else None), (verify / iters if k else None)


def ideal_speedups(plain_s: float, draft_s: float, verify_s: dict[int, float]) -> dict:
    """Per acceptance rate α: the best ``k`` and its ideal speedup, ``E[tokens]/(k·D + V_k)``
    against one plain step per token (docs/ARCHITECTURE.md §2)."""
    out = {}
    for alpha in ACCEPTANCE_RATES:
        best = max(((expected_tokens([alpha] * k, k) / (k * draft_s + v) * plain_s, k)
                    for k, v in verify_s.items()), default=(1.0, 0))
        out[str(alpha)] = {"ideal_speedup": best[0], "k": best[1]}
    return out


def sdpa_kernels(model: LlamaModel, context: int, k: int) -> dict:
    """The SDPA backend PyTorch's dispatcher picks (``torch._fused_sdp_choice``) for the decode
    ``(1, H, 1, S)`` and verify ``(1, H, k+1, S)`` shapes with our boolean mask and GQA."""
    from torch.nn.attention import SDPBackend

    s, dev = model.shape, model.device
    out = {}
    for name, T in (("decode", 1), (f"verify_k{k}", k + 1)):
        q = torch.zeros(1, s.num_heads, T, s.head_dim, device=dev, dtype=model.dtype)
        kv = torch.zeros(1, s.num_kv_heads, context, s.head_dim, device=dev, dtype=model.dtype)
        mask = torch.ones(1, 1, T, context, dtype=torch.bool, device=dev)
        try:
            choice = torch._fused_sdp_choice(q, kv, kv, attn_mask=mask, dropout_p=0.0,
                                             is_causal=False, scale=None,
                                             enable_gqa=s.num_heads != s.num_kv_heads)
            out[name] = SDPBackend(choice).name
        except (RuntimeError, TypeError, ValueError) as error:
            out[name] = f"unknown ({type(error).__name__})"
    return out


def roofline(name: str, dims: dict, device: str, quick: bool) -> dict:
    """Batch-1 plain decode against the HBM bound, and draft/verify costs at ``E = L/4``, eager
    and through the graph runner (captured on CUDA; the padded eager path on the CPU)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    context, ks, iters = (64, (1, 2), 3) if quick else (512, (1, 2, 3, 4, 6), 30)
    max_len = context + max(ks) + 2
    model = random_llama(dims, device, dtype, max_len)
    L, bs = model.num_layers, 16
    E = max(1, L // 4)
    s = model.shape
    nb = blocks_for(max_len, bs)
    cache = KVCache(L, nb, bs, s.num_kv_heads, s.head_dim, dtype, device, scratch_block=True)
    table = list(range(nb))
    cuda = device.startswith("cuda")
    mem_before = torch.cuda.memory_allocated() if cuda else 0
    graphs = GraphRunner(model, cache, 1, max_len, max(ks) + 1, capture=cuda)
    graphs.capture(E, list(ks))
    row = {"model": name, "dtype": str(dtype).removeprefix("torch."), "num_layers": L,
           "exit_layer": E, "context": context, "graphs_captured": len(graphs.graphs),
           "capture_seconds": graphs.capture_seconds,
           "capture_memory_bytes": (torch.cuda.memory_allocated() - mem_before) if cuda else None,
           "bytes_per_token": bytes_per_token(model, context),
           "sdpa_kernels": sdpa_kernels(model, context, max(ks))}
    bound = H200_HBM_BYTES_PER_S / row["bytes_per_token"] if cuda else None
    row["roofline_tokens_per_second"] = bound
    for mode, runner in (("eager", SpecDecodeRunner(model, cache)),
                         ("graphed", SpecDecodeRunner(model, cache, graphs))):
        plain_s = time_rounds(runner, table, context, E, 0, iters)[0]
        costs = {k: time_rounds(runner, table, context, E, k, iters) for k in ks}
        draft_s = sum(c[1] for c in costs.values()) / len(costs)
        row[mode] = {"plain_tokens_per_second": 1 / plain_s,
                     "roofline_fraction": (1 / plain_s) / bound if bound else None,
                     "plain_step_ms": 1e3 * plain_s, "draft_step_ms": 1e3 * draft_s,
                     "verify_ms": {k: 1e3 * c[2] for k, c in costs.items()},
                     "ideal": ideal_speedups(plain_s, draft_s, {k: c[2] for k, c in costs.items()})}
    del model, cache, graphs
    if cuda:
        torch.cuda.empty_cache()
    return row


def print_table(result: dict) -> None:
    """The figures, one line each (the README quotes this output)."""
    t = result["cuda_tests"]
    print(f"\nCUDA tests: {t['summary']} (exit {t['returncode']}, {t['seconds']:.0f} s)")
    print(f"{'batch':>5} {'mode':>8} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} "
          f"{'ideal':>6} {'accept':>6} {'mismatch':>8}")
    for r in result["speedup"]:
        print(f"{r['batch_size']:>5} {'eager' if r['enforce_eager'] else 'graphed':>8} "
              f"{r['plain_tokens_per_second']:>12.1f} {r['spec_tokens_per_second']:>11.1f} "
              f"{r['speedup']:>7.3f}x {r['ideal_speedup']:>6.2f} "
              f"{r['acceptance_rate'] or 0:>6.3f} {r['greedy_mismatches']:>8}")
    alphas = ", ".join(f"a={a}" for a in ACCEPTANCE_RATES)
    print(f"\n{'model':>13} {'mode':>8} {'tok/s b1':>9} {'bound':>8} {'of bound':>8} "
          f"{'draft ms':>8} {'verify ms by k':>30}  ideal speedup ({alphas})")
    for r in result["roofline"]:
        bound = r["roofline_tokens_per_second"]
        for mode in ("eager", "graphed"):
            m = r[mode]
            frac = f"{100 * m['roofline_fraction']:.0f} %" if bound else "-"
            verify = " ".join(f"{k}:{v:.3f}" for k, v in m["verify_ms"].items())
            ideal = ", ".join(f"{v['ideal_speedup']:.2f} (k={v['k']})" for v in m["ideal"].values())
            print(f"{r['model']:>13} {mode:>8} {m['plain_tokens_per_second']:>9.1f} "
                  f"{bound or 0:>8.0f} {frac:>8} {m['draft_step_ms']:>8.3f} {verify:>30}  {ideal}")
        print(f"{'':>13} E={r['exit_layer']} of {r['num_layers']}, context {r['context']}, "
              f"{r['graphs_captured']} graphs in {r['capture_seconds']:.2f} s, "
              f"{r['capture_memory_bytes'] or 0:.3g} bytes; SDPA {r['sdpa_kernels']}")


def parse_args(argv=None) -> argparse.Namespace:
    """The command's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and tiny model stand-ins (the CPU dry run, < 3 minutes)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="folder for the JSON")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Entry point: tests, then the speedup and roofline runs; JSON and a table."""
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)  # as the tests: OpenMP's spinning threads slow small ops
    started = time.perf_counter()
    tests = ({"returncode": None, "summary": "skipped (--skip-tests)", "seconds": 0.0}
             if args.skip_tests else run_cuda_tests())
    print(f"CUDA tests: {tests['summary']}", flush=True)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    result = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "hbm_bytes_per_second": H200_HBM_BYTES_PER_S,
              "acceptance_rates": ACCEPTANCE_RATES, "cuda_tests": tests,
              "speedup": speedup_rows(args.device, args.quick)}
    result["speedup_seconds"] = time.perf_counter() - started - tests["seconds"]
    result["roofline"] = [roofline(name, dims, args.device, args.quick)
                          for name, dims in shapes.items()]
    result["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-check-{args.device.split(':')[0]}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\n{result['seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
