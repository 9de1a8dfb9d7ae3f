"""How long a decoding stream stalls while long prompts arrive, per ``--max-num-batched-tokens``.

One sequence decodes (plain, 120 tokens) in ``EngineCore`` in this process; after three steps,
four 400-token prompts arrive. With the whole budget the first step prefills all 1 600 prompt
tokens while the stream waits; with a small budget the prompts are prefilled in chunks (chunked
prefill) and the stream's step time stays near its decode time. Prints the stream's step time
p50 and max per budget.

    python bench/prefill_stall.py --budgets 2048,128,64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def stall(budget: int, num_prompts: int, prompt_len: int) -> tuple[float, float]:
    """The decoding stream's (p50, max) step time in seconds at this token budget."""
    from engine.config import EngineConfig
    from engine.loop import EngineCore
    from engine.request import EngineRequest
    from models.loader import BUNDLED_MODEL

    core = EngineCore(EngineConfig(model=str(BUNDLED_MODEL), num_speculations=0, max_num_seqs=8,
                                   max_num_batched_tokens=budget))
    core.add_request(EngineRequest("run", tuple(range(100, 130)), 120, ignore_eos=True))
    for _ in range(3):
        core.step()
    for i in range(num_prompts):
        core.add_request(EngineRequest(f"long{i}", tuple(range(200 + i, 200 + i + prompt_len)), 4,
                                       ignore_eos=True))
    gaps = []
    while core.is_live("run"):
        start = time.perf_counter()
        outputs, _ = core.step()
        if any(o.request_id == "run" for o in outputs):
            gaps.append(time.perf_counter() - start)
    gaps.sort()
    return gaps[len(gaps) // 2], gaps[-1]


def main(argv=None) -> None:
    """Print the stream's step times per budget."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="2048,128,64", help="comma-separated token budgets")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=400)
    p.add_argument("--cpu-threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.cpu_threads)
    for budget in (int(b) for b in args.budgets.split(",")):
        p50, worst = stall(budget, args.num_prompts, args.prompt_len)
        print(f"--max-num-batched-tokens {budget}: the decoding stream's step time "
              f"p50 {1000 * p50:.1f} ms, max {1000 * worst:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
