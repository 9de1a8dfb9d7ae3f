"""guidellm runs a short synthetic benchmark against the server with zero failed requests.

guidellm (0.8.1) runs offline when given a local tokenizer (``--tokenizer
kind=huggingface_auto,model=<folder>``): it writes its synthetic prompts with that tokenizer to
exactly ``prompt_tokens`` tokens. Without ``--tokenizer`` it loads the tokenizer named by the
served model's id from the hub, and fails offline. Each request is, for ``/v1/completions``::

    {"model": "layerskip-stdlib", "stream": true,
     "stream_options": {"include_usage": true, "continuous_usage_stats": true},
     "max_tokens": 16, "ignore_eos": true, "prompt": "<32 tokens of text>"}

(it builds ``"stop": null`` too, then drops every null before sending), and for
``/v1/chat/completions`` the same with ``max_completion_tokens`` and
``"messages": [{"role": "user", "content": [{"type": "text", "text": ...}]}]``. A request
counts as errored on an HTTP error status, a ``data: {"error": ...}`` SSE line, or a response with
neither text nor output tokens; token counts come from the last non-null ``usage`` it sees.
guidellm exits 0 even when every request errored, so the test reads its JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from models.loader import BUNDLED_MODEL
from tests.clients.conftest import OFFLINE_ENV, require

REQUESTS = 16
PROMPT_TOKENS = 32
OUTPUT_TOKENS = 16


def run_guidellm(url: str, request_format: str, out_dir) -> dict:
    """A concurrent benchmark of ``REQUESTS`` requests, four in flight; returns its benchmark."""
    report = out_dir / "benchmarks.json"
    command = [
        sys.executable, "-m", "guidellm", "run",
        "--backend", f"kind=openai_http,target={url},request_format={request_format}",
        "--profile", "kind=concurrent,streams=4",
        "--constraint", f"kind=max_requests,count={REQUESTS}",
        "--constraint", "kind=max_duration,seconds=40",
        "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},"
                  f"output_tokens={OUTPUT_TOKENS}",
        "--tokenizer", f"kind=huggingface_auto,model={BUNDLED_MODEL}",
        "--output", f"kind=json,path={report}",
        "--disable-console",
    ]
    proc = subprocess.run(command, cwd=out_dir, env={**os.environ, **OFFLINE_ENV},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    benchmarks = json.loads(report.read_text())["benchmarks"]
    assert len(benchmarks) == 1
    return benchmarks[0]


@pytest.fixture(scope="session")  # session: checked before the server starts
def guidellm():
    return require("guidellm", "guidellm==0.8.1")


@pytest.mark.parametrize("request_format", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm_benchmark_has_no_failed_requests(guidellm, live_server, tmp_path,
                                                   request_format):
    benchmark = run_guidellm(live_server, request_format, tmp_path)
    errors = [r["info"]["error"] for r in benchmark["requests"]["errored"]]
    assert benchmark["metrics"]["request_totals"] == {
        "successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}, errors[:3]
    assert benchmark["scheduler_state"]["errored_requests"] == 0
    for request in benchmark["requests"]["successful"]:
        # usage as the server reported it: the prompt as guidellm counted it (plus the chat
        # template's tokens), and every one of the max_tokens, since ignore_eos is set
        prompt_tokens = request["input_metrics"]["text_tokens"]
        if request_format == "/v1/completions":
            assert prompt_tokens == PROMPT_TOKENS
        else:
            assert prompt_tokens >= PROMPT_TOKENS
        assert request["output_metrics"]["text_tokens"] == OUTPUT_TOKENS
        assert request["output"]
    assert httpx.get(live_server + "/health").status_code == 200


def test_guidellm_request_shape_with_explicit_nulls(live_server):
    """The same body with ``stop: null`` kept, as other vLLM-style clients send it."""
    body = {"model": "layerskip-stdlib", "prompt": "def main():\n", "max_tokens": OUTPUT_TOKENS,
            "stop": None, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", live_server + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read().decode()
        lines = [line[len("data: "):] for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == OUTPUT_TOKENS
