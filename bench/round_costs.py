"""What one decode round costs, by batch size and speculation length, and the speedup ceilings
that follow (issue 9's diagnostic: why self-speculation pays at one sequence and barely at eight).

For each batch size ``B`` it times, interleaved (every repeat runs every ``k`` once, in a
rotating order, so that this machine's drift hits all of them alike; ``--blocked``: each ``k``'s
rounds back to back, as a server runs them), a plain step ``P(B)`` and a
self-speculative round ``R(B, k)`` of ``k`` drafts at the engine's exit layer, with each row at
``--context`` tokens (rows staggered by a few tokens, blocks shuffled: the paged cache's gather
path at ``B > 1``, as on a server). It prints, per ``(B, k)``:

- ``R / P``: the round in plain steps; the draft call and the verify call in plain steps;
- the **ceiling** ``(k + 1) · P / R``: the speedup if every draft were accepted;
- the **ideal at the given acceptance** ``(1 + Σ_{i≤k} Π_{j<i} α_j) · P / R`` for ``--alpha``
  (per-position acceptance, e.g. what ``bench/speedup.py`` measured);
- the **row work ratio** ``(k + 1) / E[tokens]``: layer-token passes per emitted token against
  plain decoding's. Where a step's cost grows with its rows (``B`` large: attention, the KV
  gather and the MLP are per row), a round costs about that ratio times its tokens' plain steps,
  so speculation only pays when acceptance is high; where fixed per-call costs dominate (one
  sequence on a CPU), it pays at much lower acceptance.

    python bench/round_costs.py                       # B = 1, 4, 8, 16; k = 1..3
    python bench/round_costs.py --batch-sizes 8 --context 300 --alpha 0.8,0.7

Greedy rounds on dummy tokens through :class:`engine.spec_decode.SpecDecodeRunner`, as the
engine's start-up calibration runs them; nothing is emitted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.kv_cache import blocks_for  # noqa: E402
from engine.loop import EngineCore  # noqa: E402
from engine.speculation import expected_tokens  # noqa: E402
from models.loader import BUNDLED_MODEL  # noqa: E402


def time_rounds(core: EngineCore, batch_size: int, context: int, ks: list[int],
                repeats: int, blocked: bool = False) -> dict[int, dict]:
    """Median seconds of a round of each ``k`` in ``[0] + ks`` for ``batch_size`` rows near
    ``context`` tokens, with the per-call breakdown of the drafting rounds. Interleaved (every
    repeat runs every ``k``), or with ``blocked`` each ``k``'s rounds back to back, as a server
    runs one kind of round after another."""
    runner, E = core.runner, core.exit_layer
    bs, k_max = core.config.block_size, max(ks)
    lengths = [max(1, context - 3 * r) for r in range(batch_size)]
    nb = blocks_for(context + k_max + 1, bs)
    ids = list(range(1, core.cache.num_blocks))
    random.Random(0).shuffle(ids)
    if len(ids) < batch_size * nb:
        raise SystemExit(f"the KV cache holds {len(ids)} blocks, {batch_size * nb} needed")
    tables = [ids[r * nb:(r + 1) * nb] for r in range(batch_size)]
    order = [0] + ks
    times: dict[int, list[tuple]] = {k: [] for k in order}

    def one(k: int, keep: bool) -> None:
        start = time.perf_counter()
        runner.decode_round(tables, [0] * batch_size, lengths, E, k)
        if keep:
            times[k].append((time.perf_counter() - start, *(runner.last_timing or (0, 0))))

    if blocked:
        for k in order:
            for rep in range(repeats + 2):  # two warm-up rounds
                one(k, rep >= 2)
    else:
        for rep in range(repeats + 2):  # two warm-up repeats
            for k in order[rep % len(order):] + order[:rep % len(order)]:
                one(k, rep >= 2)
    return {k: {"round": statistics.median(t[0] for t in v),
                "draft_call": statistics.median(t[1] for t in v),
                "verify_call": statistics.median(t[2] for t in v)} for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--ks", default="1,2,3", help="speculation lengths to time")
    p.add_argument("--context", type=int, default=160, help="tokens already in each row's KV")
    p.add_argument("--alpha", default="0.8,0.7,0.6",
                   help="per-position acceptance for the ideal column (comma-separated)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--blocked", action="store_true",
                   help="time each k's rounds back to back instead of interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    alphas = [float(a) for a in args.alpha.split(",")]
    core = EngineCore(EngineConfig(model=args.model, adaptive_speculation=False,
                                   num_speculations=max(ks), max_num_seqs=max(sizes)))
    print(f"{core.model_name}: exit layer {core.exit_layer} of {core.model.num_layers}, "
          f"{args.context}-token rows, {args.threads} thread(s), medians of {args.repeats} "
          f"({'blocked' if args.blocked else 'interleaved'}); "
          f"acceptance by position {alphas}")
    print(" B  k  plain ms   round/P  draft call/P  verify/P  ceiling  ideal@alpha  work ratio")
    results = []
    for B in sizes:
        t = time_rounds(core, B, args.context, ks, args.repeats, args.blocked)
        P = t[0]["round"]
        for k in ks:
            r = t[k]
            tokens = expected_tokens(alphas, k)
            row = {"batch_size": B, "k": k, "plain_ms": 1e3 * P, "round_over_plain": r["round"] / P,
                   "draft_call_over_plain": r["draft_call"] / P,
                   "verify_over_plain": r["verify_call"] / P,
                   "ceiling": (k + 1) * P / r["round"], "ideal": tokens * P / r["round"],
                   "work_ratio": (k + 1) / tokens}
            results.append(row)
            print(f"{B:2d} {k:2d}  {row['plain_ms']:8.2f}  {row['round_over_plain']:8.2f}  "
                  f"{row['draft_call_over_plain']:12.2f}  {row['verify_over_plain']:8.2f}  "
                  f"{row['ceiling']:6.2f}x  {row['ideal']:10.2f}x  {row['work_ratio']:10.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "exit_layer": core.exit_layer, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
