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
