"""Overload answered fairly, on a live ``layerskip-serve``: a flood past
``--max-waiting-requests`` gets 503 + ``Retry-After`` at once, and one client's request of 2 000
prompts does not hold another client's short request behind it."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from tests.conftest import serve

MODEL = "layerskip-stdlib"


def _body(prompt, max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}


async def _wait_for_waiting(client: httpx.AsyncClient, at_least: int, seconds: float = 60) -> None:
    """Poll ``/metrics`` until ``layerskip_num_requests_waiting`` reaches ``at_least``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith("layerskip_num_requests_waiting{") and \
                    float(line.split()[-1]) >= at_least:
                return
        await asyncio.sleep(0.1)
    pytest.fail(f"fewer than {at_least} sequences waiting after {seconds} s")


def test_a_flood_past_the_bound_gets_503_with_retry_after_at_once(tmp_path):
    with serve(tmp_path / "log.txt", "--max-num-seqs", "2", "--max-waiting-requests", "4") as url:
        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                # 6 sequences: 2 run, 4 wait, and the queue is full.
                big = asyncio.create_task(client.post("/v1/completions", json=_body(
                    ["def f():"] * 6, 300)))
                await _wait_for_waiting(client, 4)
                too_big = await client.post("/v1/completions", json=_body(["x"] * 7, 2))
                times, answers = [], []
                for _ in range(30):  # a flood, one after another, each timed on its own
                    t0 = time.perf_counter()
                    r = await client.post("/v1/completions", json=_body("def g():", 2))
                    times.append(time.perf_counter() - t0)
                    answers.append(r)
                chat = await client.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                big.cancel()  # the client goes away: its 6 sequences are aborted and released
                await asyncio.gather(big, return_exceptions=True)
                deadline = time.monotonic() + 30
                while True:  # bounded: the released capacity serves a new request again
                    after = await client.post("/v1/completions", json=_body(["a"] * 6, 2))
                    if after.status_code != 503 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                return too_big, times, answers, chat, after

        too_big, times, answers, chat, after = asyncio.run(scenario())
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "prompt"
    for r in answers + [chat]:
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_overloaded"
        assert "overloaded" in error["message"]
    assert statistics.median(times) < 0.1 and max(times) < 1.0, times
    assert after.status_code == 200 and len(after.json()["choices"]) == 6


def test_a_short_request_is_not_held_behind_2000_prompts_of_another_client(tmp_path):
    with serve(tmp_path / "log.txt", "--max-num-seqs", "8", "--max-waiting-requests", "4000") as url:
        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=120) as first, \
                    httpx.AsyncClient(base_url=url, timeout=120) as second:
                flood = asyncio.create_task(first.post("/v1/completions", json=_body(
                    [[1, 2, 3, 4 + i % 50] for i in range(2000)], 16)))
                await _wait_for_waiting(second, 1900)  # none lost on the way (uvloop)
                t0 = time.perf_counter()
                r = await second.post("/v1/completions", json=_body("def main():", 4))
                elapsed = time.perf_counter() - t0
                flood.cancel()
                await asyncio.gather(flood, return_exceptions=True)
                return r, elapsed

        r, elapsed = asyncio.run(scenario())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert elapsed < 3.0, f"the short request took {elapsed:.2f} s behind 2 000 prompts"
