"""A soak test: a closed loop of mixed requests against a live server for a fixed time.

It starts ``layerskip-serve`` itself on a free loopback port (``python -m server``, default flags
plus ``--server-args``), or drives ``--url``. ``--concurrency`` clients each send one request
after another for ``--duration`` seconds, drawing its kind from ``--mix`` (weights per kind):

- ``greedy``: a non-streamed completion at temperature 0 (the server's default speculation);
- ``stream``: the same, streamed (SSE), the text put together from the chunks;
- ``plain``: the same with ``num_speculations: 0`` (plain decoding);
- ``chat``: a greedy chat completion;
- ``sampled``: a seeded sampled completion (temperature 0.8, top_p 0.95), status checked only;
- ``echo``: a greedy completion with ``echo`` and ``logprobs: 2``;
- ``disconnect``: a stream the client drops after its first chunk (counted apart, not an error).

Every greedy text (``greedy``, ``stream``, ``plain``, ``chat``, ``echo``) is checked against plain
decoding of the same request (``num_speculations: 0``, sent once per prompt before the clock
starts): self-speculative greedy output must equal plain decoding token for token, in any batch
mix. It reports, as JSON on stdout (and ``--out``): requests per kind, non-200 responses (with the
first few bodies), transport errors, greedy mismatches, tokens, requests/s, and the resident
memory (RSS, MiB) of the server and its engine process at the start and the end (only when it
started the server, or ``--pid`` names it), and the server's running/waiting gauges once idle.

    python bench/soak.py --duration 30                       # the test suite's run
    nice -n 19 python bench/soak.py --concurrency 4 --duration 1800 --out bench/results/soak.json

Needs ``pip install -e '.[bench]'`` (httpx) and psutil (in the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import corpus  # noqa: E402

KINDS = ("greedy", "stream", "plain", "chat", "sampled", "echo", "disconnect")
DEFAULT_MIX = "greedy=3,stream=3,plain=1,chat=1,sampled=1,echo=1,disconnect=1"
CHECKED = ("greedy", "stream", "plain", "chat", "echo")


def parse_mix(text: str) -> dict[str, float]:
    """``"greedy=3,stream=1"`` → ``{"greedy": 3.0, "stream": 1.0}``; a bare name weighs 1.

    Raises ``argparse.ArgumentTypeError`` for an unknown kind or a weight that is not > 0."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {name!r}; choose from {', '.join(KINDS)}")
        try:
            mix[name] = float(weight or 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} is not a number: {weight!r}") from None
        if mix[name] <= 0:
            raise argparse.ArgumentTypeError(f"weight of {name!r} must be > 0")
    if not mix:
        raise argparse.ArgumentTypeError("the mix is empty")
    return mix


def make_prompts(count: int, seed: int) -> list[dict]:
    """``count`` prompts: code windows (80..600 characters, cut at line ends) from the held-out
    ``test`` split, each with its own ``max_tokens`` (8..48)."""
    rng = random.Random(seed)
    texts = [corpus.read_text(p) for p in corpus.stdlib_files("test")]
    texts = [t for t in texts if len(t) > 2000]
    prompts = []
    for i in range(count):
        text = texts[(i * 7919) % len(texts)]
        start = text.find("\n", rng.randrange(len(text) - 700)) + 1
        end = text.rfind("\n", start, start + rng.randrange(80, 600)) + 1 or start + 80
        prompts.append({"text": text[start:end] or text[:200], "max_tokens": rng.randrange(8, 49)})
    return prompts


def request_of(kind: str, prompt: dict, model: str, plain: bool = False) -> tuple[str, dict]:
    """The endpoint path and JSON body of one request of ``kind`` on ``prompt``; ``plain`` turns
    speculation off (the reference)."""
    body = {"model": model, "max_tokens": prompt["max_tokens"], "temperature": 0}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt["text"]}]
    else:
        body["prompt"] = prompt["text"]
    if kind == "sampled":
        body.update(temperature=0.8, top_p=0.95, seed=prompt["max_tokens"])
    if kind == "echo":
        body.update(echo=True, logprobs=2)
    if kind in ("stream", "disconnect"):
        body["stream"] = True
    if plain or kind == "plain":
        body["num_speculations"] = 0
    return ("/v1/chat/completions" if kind == "chat" else "/v1/completions"), body


def text_of(kind: str, data: dict) -> str:
    """The generated text of a non-streamed response."""
    choice = data["choices"][0]
    return choice["message"]["content"] if kind == "chat" else choice["text"]


class Soak:
    """The counters of one soak run and its client loop."""

    def __init__(self, url: str, model: str, prompts: list[dict], mix: dict[str, float], seed: int):
        self.url, self.model, self.prompts, self.mix = url, model, prompts, mix
        self.rng = random.Random(seed)
        self.references: dict[tuple[str, int], str] = {}
        self.requests: Counter = Counter()
        self.non_200: Counter = Counter()
        self.non_200_bodies: list[str] = []
        self.errors: list[str] = []
        self.mismatches: list[dict] = []
        self.tokens = 0

    async def reference(self, client, kind: str, index: int) -> str:
        """Plain decoding's text for ``(kind, prompt)``: fetched once, then cached."""
        ref_kind = {"chat": "chat", "echo": "echo"}.get(kind, "greedy")
        key = (ref_kind, index)
        if key not in self.references:
            path, body = request_of(ref_kind, self.prompts[index], self.model, plain=True)
            r = await client.post(self.url + path, json=body)
            r.raise_for_status()
            self.references[key] = text_of(ref_kind, r.json())
        return self.references[key]

    async def one(self, client, kind: str, index: int) -> None:
        """Send one request and count what came back."""
        path, body = request_of(kind, self.prompts[index], self.model)
        self.requests[kind] += 1
        answer = ""
        if kind in ("stream", "disconnect"):
            status, text = await self.stream(client, path, body, drop=kind == "disconnect")
        else:
            r = await client.post(self.url + path, json=body)
            status, text, answer = r.status_code, None, r.text
            if status == 200:
                data = r.json()
                text = text_of(kind, data)
                self.tokens += data["usage"]["completion_tokens"]
        if status != 200:
            self.non_200[f"{kind}:{status}"] += 1
            if len(self.non_200_bodies) < 5:
                self.non_200_bodies.append(f"{kind} {status}: {answer[:300]}")
            return
        if kind in CHECKED:
            expected = await self.reference(client, kind, index)
            if text != expected and len(self.mismatches) < 1000:
                self.mismatches.append({"kind": kind, "prompt": index, "expected": expected, "got": text})

    async def stream(self, client, path: str, body: dict, drop: bool) -> tuple[int, str | None]:
        """A streamed request: ``(status, text)``; ``drop`` closes it after the first chunk."""
        parts = []
        async with client.stream("POST", self.url + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if drop:
                    return 200, None
                chunk = json.loads(line[6:])
                if "error" in chunk:  # an error event inside a 200 stream counts as a failure
                    return 599, None
                for choice in chunk["choices"]:
                    parts.append(choice["text"])
                if chunk.get("usage"):
                    self.tokens += chunk["usage"]["completion_tokens"]
        return 200, "".join(parts)

    async def worker(self, client, deadline: float) -> None:
        """One client of the closed loop: requests of random kinds until ``deadline``."""
        kinds, weights = list(self.mix), list(self.mix.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            index = self.rng.randrange(len(self.prompts))
            try:
                await self.one(client, kind, index)
            except Exception as exc:  # a transport error is a finding, not a crash of the soak
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])

    async def run(self, concurrency: int, duration: float) -> float:
        """Warm the references, then run ``concurrency`` workers for ``duration`` s; returns the
        measured seconds."""
        import httpx

        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            todo = [(k, i) for i in range(len(self.prompts)) for k in sorted(set(self.mix) & set(CHECKED))]

            async def warm():
                while todo:
                    await self.reference(client, *todo.pop())

            await asyncio.gather(*(warm() for _ in range(concurrency)))
            start = time.monotonic()
            await asyncio.gather(*(self.worker(client, start + duration) for _ in range(concurrency)))
            return time.monotonic() - start


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], log: Path):
    """``python -m server`` on a free loopback port; returns ``(proc, url)`` once healthy."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), *extra],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
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
    raise SystemExit("layerskip-serve did not become healthy in 180 s")


def rss_mib(pid: int | None) -> dict | None:
    """Resident memory in MiB of ``pid`` and of each of its descendants (the engine process)."""
    if pid is None:
        return None
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    per = {f"{p.pid}:{p.name()}": round(p.memory_info().rss / 2**20, 1) for p in procs}
    return {"total": round(sum(per.values()), 1), "processes": per}


def gauges(url: str) -> dict[str, float]:
    """``layerskip_num_requests_running`` and ``_waiting`` from ``/metrics``."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for name in ("layerskip_num_requests_running", "layerskip_num_requests_waiting"):
            if line.startswith(name + "{"):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def model_name(url: str) -> str:
    """The served model's name, from ``/v1/models``."""
    import httpx

    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def main(argv=None) -> int:
    """Run the soak; print its JSON report. Exits 1 on any non-200, transport error or mismatch."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=4, help="clients in the closed loop")
    p.add_argument("--duration", type=float, default=60, help="seconds of load")
    p.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                   help=f"kinds and weights (default {DEFAULT_MIX}); kinds: {', '.join(KINDS)}")
    p.add_argument("--url", help="drive this server instead of starting one")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    p.add_argument("--server-args", default="", help="extra layerskip-serve flags (quoted, one string)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    args = p.parse_args(argv)
    proc, url, pid = None, args.url, args.pid
    if url is None:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-server-{os.getpid()}.log"
        proc, url = start_server(args.server_args.split(), log)
        pid = proc.pid
    try:
        soak = Soak(url, model_name(url), make_prompts(args.num_prompts, args.seed), args.mix, args.seed)
        rss_start = rss_mib(pid)
        seconds = asyncio.run(soak.run(args.concurrency, args.duration))
        rss_end = rss_mib(pid)
        time.sleep(0.5)  # let the last steps' gauges land
        idle = gauges(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    total = sum(soak.requests.values())
    report = {
        "url": args.url or "started", "concurrency": args.concurrency, "duration_s": round(seconds, 1),
        "mix": args.mix, "requests": total, "requests_by_kind": dict(soak.requests),
        "requests_per_s": round(total / seconds, 2), "completion_tokens": soak.tokens,
        "non_200": sum(soak.non_200.values()), "non_200_by_kind": dict(soak.non_200),
        "non_200_examples": soak.non_200_bodies, "transport_errors": len(soak.errors),
        "transport_error_examples": soak.errors[:5], "greedy_mismatches": len(soak.mismatches),
        "mismatch_examples": soak.mismatches[:3], "rss_mib_start": rss_start, "rss_mib_end": rss_end,
        "idle_gauges": idle, "server_exit_code": proc.returncode if proc else None,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    failed = report["non_200"] or report["transport_errors"] or report["greedy_mismatches"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
