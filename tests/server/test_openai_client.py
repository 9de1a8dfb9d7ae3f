"""The official ``openai`` client against ``layerskip-serve`` started as a subprocess."""

from __future__ import annotations

import openai
import pytest

PROMPT = "class Stack:\n    def push(self, item):\n        "


@pytest.fixture(scope="module")
def oai(live_server):
    return openai.OpenAI(base_url=live_server + "/v1", api_key="unused", max_retries=0)


def test_models_list(oai):
    assert [m.id for m in oai.models.list().data] == ["layerskip-stdlib"]


def test_completion_and_stream_agree(oai):
    whole = oai.completions.create(model="layerskip-stdlib", prompt=PROMPT, max_tokens=32,
                                   temperature=0)
    text = whole.choices[0].text
    assert text.strip() and whole.usage.completion_tokens <= 32
    stream = oai.completions.create(model="layerskip-stdlib", prompt=PROMPT, max_tokens=32,
                                    temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text


def test_errors_are_client_errors(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="layerskip-stdlib", prompt="x", max_tokens=10**6)


def test_a_missing_checkpoint_is_a_clear_start_up_error(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_a_shared_prefix_is_served_from_the_prefix_cache(oai, live_server):
    """The second request with the same long header reports its cached prompt tokens (OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``), gets the text a fresh computation gives, and
    ``/metrics`` counts the hits; the KV usage gauge is there."""
    import httpx

    header = "".join(f"# line {i}: a header shared by many requests\n" for i in range(12))
    first = oai.completions.create(model="layerskip-stdlib", prompt=header + "def f(x):",
                                   max_tokens=16, temperature=0)
    second = oai.completions.create(model="layerskip-stdlib", prompt=header + "def g(y):",
                                    max_tokens=16, temperature=0)
    again = oai.completions.create(model="layerskip-stdlib", prompt=header + "def f(x):",
                                   max_tokens=16, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens and cached % 16 == 0  # whole 16-token blocks
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens >= cached
    metrics = httpx.get(live_server + "/metrics").text
    hits = [line for line in metrics.splitlines()
            if line.startswith("layerskip_prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= cached
    assert "layerskip_kv_cache_usage_perc{" in metrics
    assert "layerskip_num_preemptions_total{" in metrics
