"""A real Prometheus (Debian's ``prometheus``) scrapes a live ``layerskip-serve`` on loopback with
the repository's scrape config and rules (target, port and intervals rewritten), and the derived
figures come back through Prometheus' HTTP API. The last test stops the server with SIGTERM while
a request streams, to check the drain that ``terminationGracePeriodSeconds`` is sized for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest
import yaml

from tests.deploy.conftest import (DASHBOARD, K8S, PROMETHEUS_DIR, ROOT, RULE_FILES, free_port, python_env,
                                   tool)

PROMPTS = ("def read_lines(filename):\n    with open(filename) as f:\n        ",
           "class Stack:\n    def push(self, item):\n        ",
           "import os\n\ndef walk(path):\n    for root, dirs, files in ")
DEADLINE_S = 90  # for the rate windows to fill: rate() needs two samples of a changed counter


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log=None):
    """Poll ``check()`` until it returns a true value; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            result = check()
            if result:
                return result
        except (httpx.TransportError, KeyError, IndexError, ValueError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s" + (f"\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``layerskip-serve`` on the bundled model, on a free loopback port; yields (url, process)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**python_env(), "LAYERSKIP_PORT": str(port), "PYTHONPATH": str(ROOT)}
    with log.open("w") as out:
        proc = subprocess.Popen([tool("layerskip-serve"), "--max-num-seqs", "4"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("layerskip-serve /health", lambda: httpx.get(url + "/health", timeout=2).status_code == 200,
                 120, proc, log)
        yield url, proc, log
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus with the shipped config, scraping the server every second; yields its API URL."""
    url, _, _ = server
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config["rule_files"]]
    port = free_port()
    targets = {"layerskip": url.removeprefix("http://"), "prometheus": f"127.0.0.1:{port}"}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = work / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen([tool("prometheus"), f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                cwd=work, stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus /-/ready", lambda: httpx.get(api + "/-/ready", timeout=2).status_code == 200,
                 60, proc, log)
        yield api
    finally:
        stop(proc)


def query(api: str, expr: str) -> list[dict]:
    """The instant vector (or an error) that ``expr`` evaluates to now."""
    body = httpx.get(api + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def value(api: str, expr: str) -> float | None:
    """The single value of ``expr``, or None while it has no sample or is NaN."""
    result = query(api, expr)
    if not result:
        return None
    assert len(result) == 1, f"{expr}: {result}"
    v = float(result[0]["value"][1])
    return None if v != v else v


def complete(url: str, prompt: str, max_tokens: int = 48) -> dict:
    response = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "layerskip-stdlib", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def traffic(server, prometheus):
    """Completions sent while Prometheus scrapes, until the recording rules have data; returns the
    figures read back and the totals the responses reported."""
    url, _, _ = server
    api = prometheus
    wait_for("the first scrape of the server", lambda: value(api, 'up{job="layerskip"}') == 1, 30)
    time.sleep(1.5)  # a scrape before any traffic, so rate() sees the counters rise
    rules = {"acceptance": "layerskip:spec_decode_acceptance_rate:rate1m",
             "tokens_per_s": "layerskip:generation_tokens:rate1m",
             "mean_length": "layerskip:spec_decode_mean_accepted_length:rate1m",
             "ttft_p50": 'layerskip:time_to_first_token_seconds:quantile1m{quantile="0.5"}',
             "tpot_p90": 'layerskip:time_per_output_token_seconds:quantile1m{quantile="0.9"}',
             "itl_p90": 'layerskip:inter_token_latency_seconds:quantile1m{quantile="0.9"}'}
    responses, figures = [], {}
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and len(responses) < 200:
        responses.append(complete(url, PROMPTS[len(responses) % len(PROMPTS)]))
        figures = {name: value(api, expr) for name, expr in rules.items()}
        if all(v is not None for v in figures.values()) and figures["tokens_per_s"] > 0:
            break
        time.sleep(0.2)
    return figures, responses


def test_recording_rules_give_an_acceptance_rate_and_a_throughput(traffic):
    figures, responses = traffic
    print(f"after {len(responses)} requests: {figures}")
    assert all(v is not None for v in figures.values()), f"after {len(responses)} requests: {figures}"
    assert 0 <= figures["acceptance"] <= 1
    assert figures["tokens_per_s"] > 0
    num_speculations = 2  # the bundled model's num_assistant_tokens
    assert 1 <= figures["mean_length"] <= 1 + num_speculations
    assert figures["ttft_p50"] > 0 and figures["tpot_p90"] > 0 and figures["itl_p90"] > 0


def test_scraped_totals_equal_what_the_responses_reported(traffic, prometheus):
    _, responses = traffic
    expected = {
        "layerskip_spec_decode_num_accepted_tokens_total":
            sum(r["spec_decode"]["num_accepted_tokens"] for r in responses),
        "layerskip_spec_decode_num_draft_tokens_total": sum(r["spec_decode"]["num_draft_tokens"] for r in responses),
        "layerskip_generation_tokens_total": sum(r["usage"]["completion_tokens"] for r in responses),
        'layerskip_request_success_total{finished_reason="length"}': len(responses),
    }
    assert expected["layerskip_spec_decode_num_draft_tokens_total"] > 0
    wait_for(f"scraped totals {expected}",
             lambda: all(value(prometheus, f"sum({expr})") == total for expr, total in expected.items()), 15)


def test_every_rule_evaluates_without_error(traffic, prometheus):
    groups = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r.get("name") for g in groups for r in g["rules"]}
    shipped = {r.get("record") or r.get("alert") for path in RULE_FILES
               for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]}
    assert loaded == shipped
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not bad
    firing = [r["name"] for g in groups for r in g["rules"] if r.get("state") == "firing"]
    assert not firing, "a healthy server raised alerts"


def test_every_dashboard_and_adapter_query_is_valid_promql_with_data(traffic, prometheus):
    board = json.loads(DASHBOARD.read_text())

    def empty_panels() -> list[str]:
        return [panel["title"] for panel in board["panels"] for target in panel["targets"]
                # query() fails the test on invalid PromQL
                if not query(prometheus, target["expr"].replace("$model_name", ".*"))]

    # The traffic stops once its own figures have data; a series born with the first finished
    # request (request_success) needs one more scrape and rule evaluation for its rate.
    empty, deadline = empty_panels(), time.monotonic() + 15
    while empty and time.monotonic() < deadline:
        time.sleep(0.5)
        empty = empty_panels()
    assert not empty, f"panels without data after traffic: {empty}"
    names = httpx.get(prometheus + "/api/v1/label/model_name/values",
                      params={"match[]": "layerskip_num_requests_running"}, timeout=10).json()["data"]
    assert names == ["layerskip-stdlib"]
    rule = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"][0]
    adapter = (rule["metricsQuery"].replace("<<.Series>>", "layerskip_num_requests_waiting")
               .replace("<<.LabelMatchers>>", 'job="layerskip"').replace("<<.GroupBy>>", "instance"))
    assert query(prometheus, adapter)


def test_sigterm_lets_an_in_flight_stream_finish(server, traffic):
    """Runs last: it stops the server. uvicorn stops accepting on SIGTERM and waits for in-flight
    requests, so a stream started before the signal still completes, then shuts down cleanly."""
    url, proc, log = server
    max_tokens = 300
    request = {"model": "layerskip-stdlib", "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks, signalled = [], None
    with httpx.stream("POST", url + "/v1/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[len("data: "):]))
            if signalled is None:
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == max_tokens, log.read_text()[-3000:]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    # uvicorn re-raises the signal after its graceful shutdown, so the status says "SIGTERM"
    assert proc.wait(60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    text = log.read_text()
    assert "Waiting for connections to close" in text and "Finished server process" in text
    grace = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())[
        "spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert time.monotonic() - signalled < grace
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
