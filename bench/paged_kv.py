"""The paged KV cache against the static per-slot cache it replaced: decode tokens/s, interleaved.

Runs the same engine workload (greedy, EOS ignored, prompts from the held-out ``test`` split) in
child processes alternating between this checkout and a baseline revision checked out into a
temporary git worktree (default: the last commit with the static cache), and prints each arm's
median tokens/s and new / baseline:

- ``plain b=1``: plain decoding, one sequence (its blocks are consecutive: attention reads a view);
- ``spec b=1``: self-speculation with a fixed k = 2 at the checkpoint's exit layer, one sequence;
- ``plain b=8``: plain decoding, eight sequences at once (attention gathers blocks).

    python bench/paged_kv.py                      # README figure
    python bench/paged_kv.py --baseline HEAD~3 --repeats 7

Issue 10 asks batch-1 decode to stay within 3 % of the static cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATIC_CACHE_REVISION = "d1d0e41"  # the last commit before the paged KV cache
ARMS = {"plain b=1": (0, 1), "spec b=1": (2, 1), "plain b=8": (0, 8)}


def child(num_prompts: int, prompt_len: int, max_tokens: int) -> None:
    """Measure every arm once in this process (the tree on ``sys.path`` decides the code)."""
    import torch

    from engine.config import EngineConfig
    from engine.loop import EngineCore
    from engine.request import EngineRequest
    from models import corpus
    from models.loader import BUNDLED_MODEL

    torch.set_num_threads(1)
    result = {}
    for arm, (k, batch) in ARMS.items():
        core = EngineCore(EngineConfig(model=str(BUNDLED_MODEL), num_speculations=k,
                                       adaptive_speculation=False, max_num_seqs=batch))
        files = [f for f in corpus.stdlib_files("test")
                 if len(corpus.read_text(f)) > 8 * prompt_len]
        prompts = [core.tokenizer.encode(corpus.read_text(f))[:prompt_len]
                   for f in files[::max(1, len(files) // num_prompts)][:num_prompts]]
        tokens, seconds = 0, 0.0
        for lo in range(0, len(prompts), batch):
            for i, p in enumerate(prompts[lo:lo + batch]):
                core.add_request(EngineRequest(f"{lo}-{i}", tuple(p), max_tokens, ignore_eos=True))
            core.step()  # the prefill step is not decode speed
            start = time.perf_counter()
            while core.has_work():
                tokens += sum(len(o.token_ids) for o in core.step()[0])
            seconds += time.perf_counter() - start
        result[arm] = tokens / seconds
    print(json.dumps(result))


def run_child(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                          "--num-prompts", str(args.num_prompts), "--prompt-len",
                          str(args.prompt_len), "--max-tokens", str(args.max_tokens)],
                         cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the run in {tree} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=STATIC_CACHE_REVISION, help="git revision to compare")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.num_prompts, args.prompt_len, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "paged": []}
            for r in range(args.repeats):
                order = [("baseline", base), ("paged", ROOT)]
                for name, tree in order if r % 2 == 0 else order[::-1]:
                    runs[name].append(run_child(tree, args))
                print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False, capture_output=True)
    print(f"decode tokens/s, median of {args.repeats} interleaved repeats "
          f"(baseline {args.baseline}: static per-slot cache)")
    print(f"{'arm':<12} {'static':>9} {'paged':>9} {'paged/static':>13}")
    for arm in ARMS:
        b = statistics.median(x[arm] for x in runs["baseline"])
        p = statistics.median(x[arm] for x in runs["paged"])
        print(f"{arm:<12} {b:>9.1f} {p:>9.1f} {p / b:>13.3f}")


if __name__ == "__main__":
    main()
