"""The shared-prefix workload through the HTTP server, prefix caching on against off.

Every prompt is one 400-token prefix (a system prompt or few-shot header, from the held-out
``test`` split) followed by its own 16-token tail (Python outside the standard library): the
``shared`` set of ``bench/serve.py``. Two servers run side by side, ``layerskip-serve`` with its
defaults (prefix caching on) and with ``--no-enable-prefix-caching``; in one run, interleaved,
closed loops of 1, 4 and 16 clients send greedy ``/v1/completions`` streams (EOS ignored), plain
(per-request ``num_speculations: 0``) and self-speculative (the default), and the benchmark prints
TTFT p50/p99, ITL p50/p99, tokens/s, the prompt tokens the server reports cached, and TTFT
uncached / cached. Each text is checked equal across the two servers. JSON under
``bench/results/``.

    python bench/prefix_cache.py                 # the README's table
    python bench/prefix_cache.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import pct, prompt_sets, start_server  # noqa: E402
from models.loader import BUNDLED_MODEL  # noqa: E402


async def closed_loop(url: str, prompts, max_tokens: int, concurrency: int, mode: str) -> dict:
    """``concurrency`` streaming clients over ``prompts``; TTFT, ITL, tokens/s, cached tokens."""
    import httpx

    body = {"model": "layerskip-stdlib", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if mode == "plain":
        body["num_speculations"] = 0
    queue, ttft, itl, texts = list(range(len(prompts))), [], [], {}
    totals = {"tokens": 0, "cached": 0, "prompt": 0}

    async def one(client, i):
        start = last = time.perf_counter()
        parts = []
        async with client.stream("POST", url + "/v1/completions",
                                 json={**body, "prompt": prompts[i]}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    totals["tokens"] += usage["completion_tokens"]
                    totals["prompt"] += usage["prompt_tokens"]
                    totals["cached"] += usage["prompt_tokens_details"]["cached_tokens"]
                if not chunk["choices"] or not chunk["choices"][0]["text"]:
                    continue
                (itl if parts else ttft).append(now - (last if parts else start))
                parts.append(chunk["choices"][0]["text"])
                last = now
        texts[i] = "".join(parts)

    async def worker(client):
        while queue:
            await one(client, queue.pop(0))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"ttft": ttft, "itl": itl, "tokens_per_second": totals["tokens"] / seconds,
            "cached_share": totals["cached"] / totals["prompt"], "texts": texts}


def plot(rows: list[dict], path: Path) -> None:
    """TTFT p50 and tokens/s against concurrency, prefix caching on and off, plain and spec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (mode, cache), style in {("plain", "cached"): "C0-", ("plain", "uncached"): "C0--",
                                 ("spec", "cached"): "C1-", ("spec", "uncached"): "C1--"}.items():
        sel = sorted((r for r in rows if (r["mode"], r["prefix_caching"]) == (mode, cache)),
                     key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in sel]
        label = f"{mode}, prefix caching {'on' if cache == 'cached' else 'off'}"
        axes[0].plot(xs, [1000 * r["ttft_p50"] for r in sel], style, marker="o", label=label)
        axes[1].plot(xs, [r["tokens_per_second"] for r in sel], style, marker="o", label=label)
    axes[0].set(title="shared prefix: TTFT p50 (ms)", xscale="log", yscale="log",
                xlabel="concurrency")
    axes[1].set(title="shared prefix: tokens/s", xscale="log", xlabel="concurrency")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--prompts-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8775)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true", help="concurrency 1,4; 1 repeat; 8 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.repeats, args.max_tokens = "1,4", 1, 8
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    most = max(8, max(concurrencies) * args.prompts_per_client)
    shared = prompt_sets(tokenizer, most, 16)["shared"]
    args.out.mkdir(parents=True, exist_ok=True)
    servers = {}
    try:
        for i, (name, extra) in enumerate({"cached": (), "uncached": (
                "--no-enable-prefix-caching",)}.items()):
            servers[name] = start_server(args.port + i, None,
                                         args.out / f"prefix-cache-{name}-server.log", extra)
        for name, (_, url) in servers.items():  # warm up (and, cached, compute the prefix once)
            asyncio.run(closed_loop(url, shared[:2], 4, 1, "spec"))
        results: dict[tuple, list[dict]] = {}
        mismatches = 0
        for repeat in range(args.repeats):
            for c in concurrencies:
                prompts = shared[:max(8, c * args.prompts_per_client)]
                for mode in ("plain", "spec"):
                    order = ["cached", "uncached"] if repeat % 2 == 0 else ["uncached", "cached"]
                    got = {name: asyncio.run(closed_loop(servers[name][1], prompts,
                                                         args.max_tokens, c, mode))
                           for name in order}
                    mismatches += sum(got["cached"]["texts"][i] != got["uncached"]["texts"][i]
                                      for i in got["cached"]["texts"])
                    for name, r in got.items():
                        results.setdefault((c, mode, name), []).append(r)
                    print(f"repeat {repeat + 1}/{args.repeats} c={c} {mode}: TTFT p50 cached "
                          f"{1000 * pct(got['cached']['ttft'], 0.5):.1f} ms, uncached "
                          f"{1000 * pct(got['uncached']['ttft'], 0.5):.1f} ms", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    rows = []
    for (c, mode, name), runs in sorted(results.items()):
        ttft = [x for r in runs for x in r["ttft"]]
        itl = [x for r in runs for x in r["itl"]]
        rows.append({"concurrency": c, "mode": mode, "prefix_caching": name,
                     "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
                     "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99),
                     "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
                     "cached_share": statistics.median(r["cached_share"] for r in runs)})
    print(f"shared-prefix workload: {len(shared[0]) - 16}-token common prefix + 16-token tails, "
          f"{args.max_tokens} new tokens, greedy, streamed; {args.repeats} interleaved repeats\n"
          f"texts differing between the cached and uncached servers: {mismatches}")
    print(f"{'conc':>4} {'mode':<6} {'prefix cache':<12} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} "
          f"{'p99':>7} {'tok/s':>7} {'cached':>7} {'TTFT off/on':>11}   (ms)")
    for r in rows:
        on = next(x for x in rows if (x["concurrency"], x["mode"], x["prefix_caching"])
                  == (r["concurrency"], r["mode"], "cached"))
        ratio = r["ttft_p50"] / on["ttft_p50"] if r["prefix_caching"] == "uncached" else None
        print(f"{r['concurrency']:>4} {r['mode']:<6} {r['prefix_caching']:<12} "
              f"{1000 * r['ttft_p50']:>9.1f} {1000 * r['ttft_p99']:>7.1f} "
              f"{1000 * r['itl_p50']:>8.1f} {1000 * r['itl_p99']:>7.1f} "
              f"{r['tokens_per_second']:>7.1f} {r['cached_share']:>7.2f} "
              f"{'' if ratio is None else f'{ratio:.2f}x':>11}")
    plot(rows, args.out / "prefix-cache.png")
    out = args.out / "prefix-cache.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                               "mismatches": mismatches, "rows": rows}, indent=1))
    print(f"wrote {out}")
    if mismatches:
        raise SystemExit(f"{mismatches} texts differ between the cached and uncached servers")


if __name__ == "__main__":
    main()
