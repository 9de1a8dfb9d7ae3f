"""``--api-key``: bearer tokens on ``/v1/*`` and the tokenizer endpoints, 401 in the OpenAI shape
with ``WWW-Authenticate``, open probes, and the same through a real ``layerskip-serve`` with the
official ``openai`` client and the container health check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from engine.client import AsyncEngine
from engine.metrics import EngineMetrics
from server.app import build_app
from tests.conftest import serve_process

ROOT = Path(__file__).resolve().parents[2]
MODEL = "layerskip-stdlib"
KEYS = ("key-one", "key-two")


def _client(make_core, bundled_model, **app_kwargs) -> TestClient:
    core = make_core(model=bundled_model, max_num_seqs=2)
    metrics = EngineMetrics(core.model_name)
    return TestClient(build_app(AsyncEngine(core, metrics), metrics, **app_kwargs))


@pytest.fixture(scope="module")
def keyed(make_core, bundled_model):
    with _client(make_core, bundled_model, api_keys=KEYS) as c:
        yield c


def _assert_401(r) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"


PROTECTED = [("GET", "/v1/models", None),
             ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}),
             ("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 1,
                                               "messages": [{"role": "user", "content": "x"}]}),
             ("POST", "/tokenize", {"model": MODEL, "prompt": "x"}),
             ("POST", "/detokenize", {"model": MODEL, "tokens": [1]})]


@pytest.mark.parametrize("method, path, body", PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_protected_routes_need_one_of_the_keys(keyed, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"},
                    {"Authorization": "Bearer key-one-and-more"}, {"Authorization": "Bearer "}):
        _assert_401(keyed.request(method, path, json=body, headers=headers))
    for key in KEYS:
        r = keyed.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text


def test_probes_metrics_and_version_stay_open(keyed):
    for path in ("/health", "/metrics", "/version", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


def test_a_request_without_a_key_is_refused_before_its_body_is_read(keyed):
    r = keyed.post("/v1/completions", content=b"{" * (20 * 2**20),
                   headers={"Content-Type": "application/json"})
    _assert_401(r)  # not the 413 the body would get


def test_protect_metrics_puts_metrics_behind_the_key_too(make_core, bundled_model):
    with _client(make_core, bundled_model, api_keys=KEYS, protect_metrics=True) as c:
        _assert_401(c.get("/metrics"))
        assert c.get("/metrics", headers={"Authorization": "Bearer key-two"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_the_openapi_document_names_the_scheme_on_the_protected_routes(keyed):
    doc = keyed.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "one of the server's --api-key values"}
    for path, item in doc["paths"].items():
        for operation in item.values():
            protected = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
            assert ("security" in operation) == protected, path
            assert ("401" in operation["responses"]) == protected, path


def test_the_server_reads_keys_from_the_environment(tmp_path):
    """A real server with ``LAYERSKIP_API_KEY=k1,k2``: the openai client with either key works,
    a wrong one gets ``AuthenticationError``; ``/health`` and the image's health check (which
    sends no key) still pass; the start-up line names model path, device, dtype, threads, KV."""
    log = tmp_path / "log.txt"
    with serve_process(log, "--cpu-threads", "1", env={"LAYERSKIP_API_KEY": "k1, k2"}) as (url, _):
        for key in ("k1", "k2"):
            oai = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            done = oai.completions.create(model=MODEL, prompt="import os\n", max_tokens=4,
                                          temperature=0)
            assert done.choices[0].text
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="k3", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        port = url.rsplit(":", 1)[1]
        check = subprocess.run([sys.executable, "scripts/healthcheck.py"], cwd=ROOT, timeout=30,
                               env={"LAYERSKIP_PORT": port, "PATH": "/usr/bin:/bin"})
        assert check.returncode == 0
    text = log.read_text()
    line = next(x for x in text.splitlines() if "serving layerskip-stdlib from" in x)
    for part in ("models/layerskip-stdlib", "device cpu", "dtype float32", "1 cpu threads",
                 "KV cache"):
        assert part in line, (part, line)


def test_the_dev_endpoint_needs_a_key_too(make_core, bundled_model, keyed):
    """``POST /reset_prefix_cache`` is behind the key with ``server_dev_mode``; without it the
    path still asks for the key first (401), then is a 404."""
    with _client(make_core, bundled_model, api_keys=KEYS, server_dev_mode=True) as c:
        _assert_401(c.post("/reset_prefix_cache"))
        assert c.post("/reset_prefix_cache",
                      headers={"Authorization": "Bearer key-one"}).status_code == 200
    _assert_401(keyed.post("/reset_prefix_cache"))
    assert keyed.post("/reset_prefix_cache",
                      headers={"Authorization": "Bearer key-one"}).status_code == 404
