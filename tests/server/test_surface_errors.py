"""Every invalid value gets a 400 in the OpenAI error shape naming the parameter, and the server
stays healthy: after each bad request a normal greedy request returns the same text as before.

Bodies are sent as raw JSON text (so that ``NaN`` and ``Infinity`` reach the server as a client
that writes them would send them), through the real app on the bundled model.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.server.conftest import make_client

MODEL = "layerskip-stdlib"
PROMPT = "def read_config(path):\n    with open(path) as f:\n        "
CHAT = [{"role": "user", "content": "Read a JSON file."}]


def _post(client, path: str, body: dict | str):
    raw = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def _greedy_text(client) -> str:
    r = _post(client, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "temperature": 0,
                                          "max_tokens": 12})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def before(client) -> str:
    """The greedy text that every request after a bad one must still give."""
    return _greedy_text(client)


def _assert_openai_error(r, status: int, param: str | None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["param"] == param, err
    assert err["message"] and err["type"] == "invalid_request_error"
    return err


def _completion(**fields) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}


COMPLETION_ERRORS = [
    # not finite
    ('{"model": "%s", "prompt": "x", "temperature": NaN}' % MODEL, "temperature"),
    ('{"model": "%s", "prompt": "x", "top_p": Infinity}' % MODEL, "top_p"),
    ('{"model": "%s", "prompt": "x", "presence_penalty": -Infinity}' % MODEL, "presence_penalty"),
    ('{"model": "%s", "prompt": "x", "frequency_penalty": NaN}' % MODEL, "frequency_penalty"),
    ('{"model": "%s", "prompt": "x", "min_p": NaN}' % MODEL, "min_p"),
    ('{"model": "%s", "prompt": "x", "repetition_penalty": Infinity}' % MODEL,
     "repetition_penalty"),
    ('{"model": "%s", "prompt": "x", "max_tokens": NaN}' % MODEL, "max_tokens"),
    ('{"model": "%s", "prompt": "x", "seed": Infinity}' % MODEL, "seed"),
    # out of range
    (_completion(temperature=3), "temperature"),
    (_completion(temperature=-0.1), "temperature"),
    (_completion(top_p=0), "top_p"),
    (_completion(top_p=1.5), "top_p"),
    (_completion(top_k=-2), "top_k"),
    (_completion(min_p=1.5), "min_p"),
    (_completion(logprobs=6), "logprobs"),
    (_completion(logprobs=-1), "logprobs"),
    (_completion(presence_penalty=3), "presence_penalty"),
    (_completion(frequency_penalty=-2.5), "frequency_penalty"),
    (_completion(repetition_penalty=0), "repetition_penalty"),
    (_completion(repetition_penalty=1e-40), "repetition_penalty"),  # overflows float32
    (_completion(repetition_penalty=10.5), "repetition_penalty"),
    (_completion(n=0), "n"),
    (_completion(n=17), "n"),
    (_completion(max_tokens=-1), "max_tokens"),
    (_completion(max_tokens=0), "max_tokens"),
    (_completion(seed=2**64), "seed"),
    (_completion(seed=-2**70), "seed"),
    (_completion(best_of=0), "best_of"),
    (_completion(best_of=3), "best_of"),
    (_completion(suffix="\n"), "suffix"),
    (_completion(logit_bias={"5": 10}), "logit_bias"),
    # wrong types
    (_completion(temperature="0"), "temperature"),
    (_completion(n=1.5), "n"),
    (_completion(n=True), "n"),
    (_completion(max_tokens="4"), "max_tokens"),
    (_completion(echo="yes"), "echo"),
    (_completion(stop=5), "stop"),
    (_completion(stop=["a", 5]), "stop"),
    (_completion(logprobs=True), "logprobs"),
    (_completion(prompt=5), "prompt"),
    (_completion(prompt=None), "prompt"),
    (_completion(prompt=["a", 1]), "prompt"),
    (_completion(prompt=[1.5, 2]), "prompt"),
    (_completion(prompt={"text": "x"}), "prompt"),
    (_completion(stream_options={"include_usage": "yes"}, stream=True), "stream_options"),
    (_completion(stop_token_ids=[1.0]), "stop_token_ids"),
    (_completion(exit_layer="2"), "exit_layer"),
    (_completion(user=5), "user"),
    ({"prompt": PROMPT}, "model"),
    # empty or too many
    (_completion(prompt=[]), "prompt"),
    (_completion(prompt=[[]]), "prompt"),
    (_completion(prompt=[""]), "prompt"),
    (_completion(prompt=""), "prompt"),
    (_completion(stop=["a", "b", "c", "d", "e"]), "stop"),
    (_completion(stop=""), "stop"),
    (_completion(stop=["x", ""]), "stop"),
    (_completion(stream_options={"include_usage": True}), "stream_options"),
    (_completion(stream_options={"include_usage": True}, stream=False), "stream_options"),
    # outside the vocabulary or the context
    (_completion(prompt=[1, 2, 4096]), "prompt"),
    (_completion(prompt=[-1]), "prompt"),
    (_completion(prompt=[[5, 6], [7, 99999]]), "prompt"),
    (_completion(stop_token_ids=[4096]), "stop_token_ids"),
    (_completion(stop_token_ids=[-1]), "stop_token_ids"),
    (_completion(prompt=[5] * 600), "prompt"),
    (_completion(prompt=[5] * 512), "prompt"),
    (_completion(prompt=[5] * 600, max_tokens=None), "prompt"),
    (_completion(prompt=[5] * 600, max_tokens=0, echo=True), "prompt"),
    (_completion(prompt=[5] * 100, max_tokens=413), "max_tokens"),
    # speculation extras
    (_completion(exit_layer=0), "exit_layer"),
    (_completion(exit_layer=17), "exit_layer"),
    (_completion(exit_layer=99), "exit_layer"),
    (_completion(exit_layer=-1), "exit_layer"),
    (_completion(num_speculations=99), "num_speculations"),
    (_completion(num_speculations=-1), "num_speculations"),
]


# The same refusals with "stream": true (an error, not an event stream).
STREAMED_ERRORS = [({**body, "stream": True}, param) for body, param in COMPLETION_ERRORS
                   if isinstance(body, dict) and "stream" not in body and param != "stream_options"]


@pytest.mark.parametrize("body,param", COMPLETION_ERRORS + STREAMED_ERRORS,
                         ids=[f"{i}-{p}" for i, (_, p) in enumerate(COMPLETION_ERRORS)]
                         + [f"{i}-{p}-stream" for i, (_, p) in enumerate(STREAMED_ERRORS)])
def test_bad_completion_is_a_400_naming_the_param(client, before, body, param):
    _assert_openai_error(_post(client, "/v1/completions", body), 400, param)
    assert _greedy_text(client) == before


def test_the_context_limit_is_exact(client):
    limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
    ok = _post(client, "/v1/completions", _completion(prompt=[5] * 500, max_tokens=limit - 500,
                                                      temperature=0, ignore_eos=True))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == limit - 500
    echo = _post(client, "/v1/completions", _completion(prompt=[5] * limit, max_tokens=0,
                                                        echo=True))
    assert echo.status_code == 200 and echo.json()["usage"]["prompt_tokens"] == limit
    err = _assert_openai_error(_post(client, "/v1/completions", _completion(
        prompt=[5] * 500, max_tokens=limit - 499)), 400, "max_tokens")
    assert str(limit) in err["message"]


def test_unknown_model_is_a_404(client, before):
    err = _assert_openai_error(_post(client, "/v1/completions", _completion(model="gpt-4")),
                               404, "model")
    assert err["code"] == "model_not_found"
    _assert_openai_error(_post(client, "/v1/chat/completions",
                               {"model": "gpt-4", "messages": CHAT}), 404, "model")
    assert _greedy_text(client) == before


def test_a_model_name_that_is_not_valid_unicode_is_a_404_not_a_crash(client, before):
    r = _post(client, "/v1/completions", '{"model": "\\ud800", "prompt": "x"}')
    _assert_openai_error(r, 404, "model")
    assert _greedy_text(client) == before


def test_unknown_routes_and_methods_answer_in_the_openai_shape(client):
    for r, status in ((client.get("/v1/nothing"), 404), (client.get("/v1/completions"), 405)):
        assert r.status_code == status
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_malformed_bodies_are_400s(client, before):
    for raw in ("{not json", "[1, 2]", '"prompt"', ""):
        r = _post(client, "/v1/completions", raw)
        assert r.status_code == 400, (raw, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _greedy_text(client) == before


def test_top_k_above_the_vocabulary_is_no_truncation_not_a_crash(client, before):
    body = _completion(temperature=1.0, seed=3, max_tokens=6)
    base = _post(client, "/v1/completions", body).json()["choices"][0]["text"]
    for k in (4095, 4096, 4097, 100000):
        r = _post(client, "/v1/completions", {**body, "top_k": k})
        assert r.status_code == 200, r.text
        if k >= 4096:
            assert r.json()["choices"][0]["text"] == base
    assert _greedy_text(client) == before


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 4, **fields}


CHAT_ERRORS = [
    (_chat(messages=[]), "messages"),
    (_chat(messages="hello"), "messages"),
    (_chat(messages=[{"role": "wizard", "content": "x"}]), "messages"),
    (_chat(messages=[{"content": "x"}]), "messages"),
    (_chat(messages=[{"role": "user", "content": 5}]), "messages"),
    (_chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]), "messages"),
    (_chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (_chat(top_logprobs=2), "top_logprobs"),
    (_chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (_chat(logprobs=3), "logprobs"),
    (_chat(max_tokens=0), "max_tokens"),
    (_chat(max_completion_tokens=0), "max_completion_tokens"),
    (_chat(max_completion_tokens=10**6), "max_completion_tokens"),
    (_chat(max_tokens=10**6), "max_tokens"),
    (_chat(response_format={"type": "json_object"}), "response_format"),
    (_chat(temperature=3), "temperature"),
    (_chat(n=0), "n"),
    (_chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (_chat(stream_options={"include_usage": True}), "stream_options"),
    (_chat(exit_layer=0), "exit_layer"),
    (_chat(num_speculations=99), "num_speculations"),
    (_chat(stop_token_ids=[4096]), "stop_token_ids"),
    (_chat(messages=[{"role": "user", "content": "x " * 600}]), "messages"),
    (_chat(messages=[{"role": "user", "content": "x " * 600}], max_tokens=None), "messages"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}' % MODEL,
     "top_p"),
]


@pytest.mark.parametrize("body,param", CHAT_ERRORS,
                         ids=[f"{i}-{p}" for i, (_, p) in enumerate(CHAT_ERRORS)])
def test_bad_chat_is_a_400_naming_the_param(client, before, body, param):
    _assert_openai_error(_post(client, "/v1/chat/completions", body), 400, param)
    assert _greedy_text(client) == before


@pytest.fixture(scope="module")
def no_template_client(bundled_model, make_core, tmp_path_factory):
    """The app on a copy of the bundled checkpoint without its chat template."""
    folder = tmp_path_factory.mktemp("no-template") / "layerskip-stdlib"
    shutil.copytree(bundled_model, folder, ignore=shutil.ignore_patterns("chat_template.jinja"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    with make_client(make_core, model=str(folder), max_num_seqs=2) as c:
        yield c


def test_a_model_without_a_chat_template_refuses_chat_with_a_400(no_template_client, before):
    for stream in (False, True):
        r = _post(no_template_client, "/v1/chat/completions", _chat(stream=stream))
        err = _assert_openai_error(r, 400, "messages")
        assert "chat template" in err["message"]
    assert _greedy_text(no_template_client) == before  # completions still work, same model
