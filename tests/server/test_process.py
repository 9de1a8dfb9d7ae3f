"""The process boundary: the engine core's own process dying, SIGTERM drains, no orphans, and the
event loop staying responsive under huge bodies (a live ``layerskip-serve`` each)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import serve_process

MODEL = "layerskip-stdlib"


def _engine_pid(proc) -> int:
    """The engine process: the server's one child that loads torch (the others are
    multiprocessing's resource tracker and the body-scan worker)."""
    engines = [c for c in psutil.Process(proc.pid).children() if _maps_torch(c.pid)]
    assert len(engines) == 1, engines
    return engines[0].pid


def _maps_torch(pid: int) -> bool:
    return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())


def _stream(url: str, max_tokens: int, events: list, first: threading.Event | None = None,
            prompt: str = "def main():\n") -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if first is not None:
                    first.set()


def test_engine_killed_mid_stream_errors_the_stream_and_the_server_exits_nonzero(tmp_path):
    """Also: the API process never loads torch (docs/ARCHITECTURE.md §1), not even once step
    messages arrive (unpickling a class from a module that imports torch would load it)."""
    with serve_process(tmp_path / "log.txt") as (url, proc):
        engine = _engine_pid(proc)
        events, first = [], threading.Event()
        t = threading.Thread(target=_stream, args=(url, 400, events, first))
        t.start()
        assert first.wait(60)
        assert not _maps_torch(proc.pid)
        os.kill(engine, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "engine process died" in error["message"] and error["type"] == "server_error"
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503
        refused = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x",
                                                             "max_tokens": 2}, timeout=5)
        assert refused.status_code == 503 and "error" in refused.json()
        assert proc.wait(30) == 1


def test_sigterm_drains_running_streams_and_exits_zero(tmp_path):
    with serve_process(tmp_path / "log.txt") as (url, proc):
        streams = [[] for _ in range(4)]
        firsts = [threading.Event() for _ in streams]
        threads = [threading.Thread(target=_stream, args=(url, 48, s, f))
                   for s, f in zip(streams, firsts)]
        for t in threads:
            t.start()
        assert all(f.wait(60) for f in firsts)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        for events in streams:
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert last["choices"][0]["finish_reason"] == "length", last
        assert proc.wait(60) == 0
    log = (tmp_path / "log.txt").read_text()
    assert "draining" in log and "Traceback" not in log


def test_sigterm_past_the_grace_time_ends_every_stream_with_an_error_and_done(tmp_path):
    with serve_process(tmp_path / "log.txt", "--timeout-graceful-shutdown", "1",
                       "--max-num-seqs", "8") as (url, proc):
        streams = [[] for _ in range(8)]
        firsts = [threading.Event() for _ in streams]
        threads = [threading.Thread(target=_stream, args=(url, 480, s, f))
                   for s, f in zip(streams, firsts)]
        for t in threads:
            t.start()
        assert all(f.wait(60) for f in firsts)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        for events in streams:
            assert events[-1] == "[DONE]", events[-3:]
            assert "shutting down" in json.loads(events[-2])["error"]["message"]
        assert proc.wait(60) == 0
        assert time.monotonic() - started < 15


PROBE = """
import sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
slowest, n, end = 0.0, 0, time.monotonic() + seconds
with httpx.Client(timeout=5) as c:
    while time.monotonic() < end:
        t = time.perf_counter()
        assert c.get(url + "/health").status_code == 200
        slowest, n = max(slowest, time.perf_counter() - t), n + 1
        time.sleep(0.01)
print(slowest, n)
"""


def test_a_10_mb_prompt_is_refused_fast_while_health_keeps_answering(tmp_path):
    """The prober runs in its own process, so that this one's sending cannot slow it."""
    import subprocess
    import sys

    with serve_process(tmp_path / "log.txt") as (url, _):
        prober = subprocess.Popen([sys.executable, "-c", PROBE, url, "3"], stdout=subprocess.PIPE,
                                  text=True)
        time.sleep(1.0)
        body = json.dumps({"model": MODEL, "prompt": "x = 1\n" * (10 * 2**20 // 6),
                           "max_tokens": 4}).encode()
        t = time.perf_counter()
        r = httpx.post(url + "/v1/completions", content=body,
                       headers={"Content-Type": "application/json"}, timeout=30)
        elapsed = time.perf_counter() - t
        slowest, probes = prober.communicate(timeout=30)[0].split()
        assert prober.returncode == 0
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    print(f"10 MB prompt refused in {elapsed * 1000:.0f} ms; slowest /health "
          f"{float(slowest) * 1000:.1f} ms over {probes} probes")
    assert elapsed < 1.0, f"the 10 MB prompt took {elapsed:.2f} s"
    # The body is parsed in the body-scan worker process, so the API process's GIL stays free:
    # 8-16 ms here over five runs (up to 126 ms when the parse ran in a thread).
    assert float(slowest) < 0.1


def test_a_100_mb_body_gets_413_before_it_is_read(tmp_path):
    with serve_process(tmp_path / "log.txt") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      b"\r\nContent-Length: " + str(100 * 2**20).encode() + b"\r\n\r\n{\"model\"")
            data = b""
            while chunk := s.recv(65536):  # the server closes after its 413
                data += chunk
            head = data.decode()
        assert head.startswith("HTTP/1.1 413"), head
        assert '"error"' in head and "max-request-body-bytes" in head
        assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(tmp_path):
    with serve_process(tmp_path / "log.txt", "--max-request-body-bytes", "1000") as (url, _):
        def chunks():
            for _ in range(100):
                yield b" " * 100

        r = httpx.post(url + "/v1/completions", content=chunks(),
                       headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 413 and "error" in r.json()
        ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                       "temperature": 0}, timeout=30)
        assert ok.status_code == 200


@pytest.mark.parametrize("flag", ["--cpu-threads=2"])
def test_cpu_threads_flag_reaches_the_engine(tmp_path, flag):
    with serve_process(tmp_path / "log.txt", flag) as (url, _):
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert "2 cpu threads" in (tmp_path / "log.txt").read_text()


def test_step_messages_larger_than_one_pipe_write_arrive_whole(tmp_path):
    """Echo with logprobs of a long prompt makes a step message of tens of kB, which the engine
    writes in two parts; the API side must wait for the second (uvloop makes the pipe
    non-blocking, and a half-read message used to read as the engine's death: a 503, then exit)."""
    prompt = "".join(f"    value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1, 32))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True,
            "logprobs": 5}
    with serve_process(tmp_path / "log.txt") as (url, proc):
        for _ in range(3):
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"][0]["logprobs"]["tokens"]) > 300
        assert proc.poll() is None and httpx.get(url + "/health", timeout=5).status_code == 200


def _gauges(url: str) -> dict[str, float]:
    """The running and waiting gauges and the abort count, from ``/metrics``."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for name in ("layerskip_num_requests_running", "layerskip_num_requests_waiting"):
            if line.startswith(name + "{"):
                out[name.rsplit("_", 1)[1]] = float(line.rsplit(" ", 1)[1])
        if line.startswith("layerskip_request_success_total{") and 'finished_reason="abort"' in line:
            out["aborted"] = float(line.rsplit(" ", 1)[1])
    return out


def _wait_for(url: str, check, seconds: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while True:
        gauges = _gauges(url)
        if check(gauges) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.1)


LONG = {"model": MODEL, "prompt": "def main():\n", "max_tokens": 480, "temperature": 0,
        "ignore_eos": True}


def _raw_post(port: int, body: dict) -> socket.socket:
    """A completions request on a raw socket (so that closing it drops the connection at once)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def test_clients_that_disconnect_free_their_slots(tmp_path):
    """Streams dropped after their first chunk and non-streamed requests whose connection closes
    mid-decode are aborted: the running and waiting gauges go back to 0, and the server still
    serves."""
    with serve_process(tmp_path / "log.txt", "--max-num-seqs", "2") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        before = _gauges(url).get("aborted", 0.0)
        for _ in range(2):  # streamed: read one event, then close
            with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True},
                              timeout=60) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
        socks = [_raw_post(port, LONG) for _ in range(3)]  # non-streamed: 2 run, 1 waits
        busy = _wait_for(url, lambda g: g["running"] == 2 and g["waiting"] == 1)
        assert (busy["running"], busy["waiting"]) == (2, 1), busy
        for s in socks:
            s.close()
        idle = _wait_for(url, lambda g: g["running"] == g["waiting"] == 0)
        assert (idle["running"], idle["waiting"]) == (0, 0), idle
        assert idle["aborted"] - before == 5
        ok = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_sigterm_drains_8_streams_and_refuses_new_work(tmp_path):
    """Inside the grace time all 8 streams finish normally; a request that reaches the server
    after SIGTERM gets 503 (or finds the port closed), never a 200 or a hang; exit 0."""
    with serve_process(tmp_path / "log.txt") as (url, proc):
        streams = [[] for _ in range(8)]
        firsts = [threading.Event() for _ in streams]
        threads = [threading.Thread(target=_stream, args=(url, 64, s, f))
                   for s, f in zip(streams, firsts)]
        for t in threads:
            t.start()
        assert all(f.wait(60) for f in firsts)
        proc.send_signal(signal.SIGTERM)
        try:
            late = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=10)
            assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        except httpx.ConnectError:
            pass  # uvicorn had already closed its listening socket: refused, as it should be
        for t in threads:
            t.join(60)
        for events in streams:
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0


def test_sigterm_past_the_grace_time_gives_waiting_requests_a_503_body(tmp_path):
    """8 streams fill the batch (``--max-num-seqs 8``), 2 non-streamed requests wait behind
    them; past the grace time every stream ends with an error event and [DONE], each waiting
    request gets a 503 body in the OpenAI error shape, and the process exits 0."""
    with serve_process(tmp_path / "log.txt", "--timeout-graceful-shutdown", "1",
                       "--max-num-seqs", "8") as (url, proc):
        streams = [[] for _ in range(8)]
        firsts = [threading.Event() for _ in streams]
        threads = [threading.Thread(target=_stream, args=(url, 480, s, f))
                   for s, f in zip(streams, firsts)]
        for t in threads:
            t.start()
        assert all(f.wait(60) for f in firsts)
        answers = []

        def whole():
            r = httpx.post(url + "/v1/completions", json=LONG, timeout=60)
            answers.append((r.status_code, r.json()))

        waiting = [threading.Thread(target=whole) for _ in range(2)]
        for t in waiting:
            t.start()
        assert _wait_for(url, lambda g: g["waiting"] == 2)["waiting"] == 2
        proc.send_signal(signal.SIGTERM)
        for t in threads + waiting:
            t.join(60)
        for events in streams:
            assert events[-1] == "[DONE]", events[-3:]
            assert "shutting down" in json.loads(events[-2])["error"]["message"]
        assert len(answers) == 2
        for status, body in answers:
            assert status == 503 and body["error"]["type"] == "server_error"
            assert "shutting down" in body["error"]["message"]
        assert proc.wait(60) == 0


def test_a_request_that_cannot_be_sent_fails_alone_and_the_next_one_runs():
    """A message the sender thread cannot pickle fails its own request with an error; before, the
    thread died on it and every later request waited forever."""
    import asyncio
    import dataclasses

    from engine.client import MPEngineClient
    from engine.config import EngineConfig
    from engine.request import EngineRequest
    from models import BUNDLED_MODEL

    async def run(client):
        client.start()
        bad = EngineRequest("bad", (1, 2, 3), max_tokens=4)
        object.__setattr__(bad, "group_id", threading.Lock())  # a lock does not pickle
        with pytest.raises(RuntimeError, match="could not be sent to the engine"):
            async for _ in client.generate(bad):
                pass
        good = EngineRequest("good", (1, 2, 3), max_tokens=4, ignore_eos=True)
        return [o async for o in client.generate(good)]

    client = MPEngineClient(EngineConfig(model=str(BUNDLED_MODEL)), cpu_threads=1)
    client.load(timeout=120)
    try:
        outputs = asyncio.run(asyncio.wait_for(run(client), 120))
    finally:
        client.shutdown()
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in outputs) == 4, [dataclasses.asdict(o) for o in outputs]
    assert not client._proc.is_alive()
