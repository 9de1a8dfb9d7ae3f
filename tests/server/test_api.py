"""The HTTP API on the bundled model: shapes, streaming, errors, metrics."""

from __future__ import annotations

import json

import pytest

MODEL = "layerskip-stdlib"
PROMPT = "def read_config(path):\n    with open(path) as f:\n        "


def _complete(client, **body):
    """A greedy completion unless ``body`` says otherwise (the API's default temperature is 1)."""
    return client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "temperature": 0,
                                                 **body})


def _events(response) -> list:
    lines = [ln for ln in response.text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_completion_equals_the_same_request_with_speculation_off(client, plain_client):
    spec = _complete(client, max_tokens=48, temperature=0).json()
    plain = _complete(plain_client, max_tokens=48, temperature=0).json()
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert spec["choices"][0]["text"].strip()
    assert spec["spec_decode"]["num_draft_tokens"] > 0
    assert plain["spec_decode"]["num_draft_tokens"] == 0


def test_response_shape_and_usage(client):
    r = _complete(client, max_tokens=5)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_absent_max_tokens_runs_to_the_context_length(client):
    limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                 "ignore_eos": True}).json()
    usage = body["usage"]
    assert usage["completion_tokens"] == limit - usage["prompt_tokens"]
    assert body["choices"][0]["finish_reason"] == "length"


def test_list_of_prompts_gives_one_choice_each(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [PROMPT, "import"],
                                              "max_tokens": 6, "temperature": 0})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    single = _complete(client, max_tokens=6).json()["choices"][0]["text"]
    assert choices[0]["text"] == single


def test_stream_concatenates_to_the_non_streamed_text(client):
    whole = _complete(client, max_tokens=40).json()
    r = _complete(client, max_tokens=40, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    chunks, final = events[:-1], events[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert final["choices"] == [] and final["usage"] == whole["usage"]


def test_models_health_and_metrics(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] > 0
    assert client.get("/health").status_code == 200
    before = _metric(client, "layerskip_generation_tokens_total")
    drafted_before = _metric(client, "layerskip_spec_decode_num_draft_tokens_total")
    _complete(client, max_tokens=12, ignore_eos=True)
    assert _metric(client, "layerskip_generation_tokens_total") == before + 12
    assert _metric(client, "layerskip_spec_decode_num_draft_tokens_total") > drafted_before
    assert 0.0 <= _metric(client, "layerskip_spec_decode_acceptance_rate") <= 1.0
    assert _metric(client, "layerskip_generation_tokens_per_second") > 0
    text = client.get("/metrics").text
    for name in ("layerskip_spec_decode_num_drafts_total", "layerskip_prompt_tokens_total",
                 "layerskip_num_requests_running", "layerskip_num_requests_waiting",
                 "layerskip_spec_decode_num_accepted_tokens_total",
                 "layerskip_time_to_first_token_seconds_bucket",
                 "layerskip_inter_token_latency_seconds_bucket"):
        assert name in text


def test_metrics_have_vllm_request_histograms_and_no_created_series(client):
    count = _metric(client, "layerskip_request_queue_time_seconds_count")
    prompt_sum = _metric(client, "layerskip_request_prompt_tokens_sum")
    generated_sum = _metric(client, "layerskip_request_generation_tokens_sum")
    body = _complete(client, max_tokens=5, ignore_eos=True).json()
    assert _metric(client, "layerskip_request_queue_time_seconds_count") == count + 1
    assert 0 <= _metric(client, "layerskip_request_queue_time_seconds_sum") < 60
    assert (_metric(client, "layerskip_request_prompt_tokens_sum") - prompt_sum
            == body["usage"]["prompt_tokens"])
    assert _metric(client, "layerskip_request_generation_tokens_sum") - generated_sum == 5
    text = client.get("/metrics").text
    assert 'layerskip_request_prompt_tokens_bucket{le="5.0",model_name=' in text
    assert 'layerskip_request_queue_time_seconds_bucket{le="0.3",model_name=' in text
    created = [line for line in text.splitlines() if "_created" in line]
    assert not created, created[:3]


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": [[1, 999999]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "prompt": "\ud800"}, 400, "prompt"),
    ({"model": MODEL, "prompt": ["ok", "\udfff"], "stream": True}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [True, False]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
])
def test_bad_requests_get_openai_errors_and_the_engine_survives(client, body, status, param):
    r = client.post("/v1/completions", content=json.dumps(body),  # ASCII-escaped, like most clients
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    assert _complete(client, max_tokens=3).status_code == 200


def test_context_overflow_names_both_numbers(client):
    limit = client.get("/v1/models").json()["data"][0]["max_model_len"]
    err = _complete(client, max_tokens=limit).json()["error"]
    assert str(limit) in err["message"] and f"{limit} for the completion" in err["message"]


def test_aborted_requests_are_counted_and_leave_the_gauges_at_zero(client):
    import asyncio

    engine = client.app.state.engine
    core = engine.core
    prompt = tuple(core.tokenizer.encode(PROMPT))

    async def abandon():
        from engine.request import EngineRequest

        stream = engine.generate(EngineRequest("abandoned", prompt, 200, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # what a client that goes away does: the request is aborted

    before = client.app.state.metrics.registry.get_sample_value(
        "layerskip_request_success_total", {"model_name": MODEL, "finished_reason": "abort"}) or 0
    client.portal.call(abandon)
    _complete(client, max_tokens=2)  # a later step publishes the abort
    after = client.app.state.metrics.registry.get_sample_value(
        "layerskip_request_success_total", {"model_name": MODEL, "finished_reason": "abort"})
    assert after == before + 1
    assert _metric(client, "layerskip_num_requests_running") == 0
    assert _metric(client, "layerskip_num_requests_waiting") == 0


def test_malformed_json_is_a_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored(client):
    assert _complete(client, max_tokens=2, some_client_extension={"a": 1}).status_code == 200


def test_chat_logprob_bytes_concatenate_to_the_content(client):
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "# café ü\nprint('naïve')"}],
        "max_completion_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 2})
    choice = r.json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == r.json()["usage"]["completion_tokens"]
    if choice["finish_reason"] == "stop":  # the EOS token: counted, with bytes, but no text
        entries = entries[:-1]
    raw = b"".join(bytes(e["bytes"]) for e in entries)
    assert raw.decode("utf-8", "replace") == choice["message"]["content"]
    assert all(len(e["top_logprobs"]) == 2 for e in entries)


def test_reset_prefix_cache_is_a_dev_mode_endpoint(bundled_model, make_core, client):
    """With ``server_dev_mode`` ``POST /reset_prefix_cache`` empties the prefix cache, so a
    repeated prompt is prefilled from scratch again (and gives the same text); without it the
    path is a 404 in OpenAI's error shape."""
    from fastapi.testclient import TestClient

    from engine.client import AsyncEngine
    from engine.metrics import EngineMetrics
    from server.app import build_app

    header = "".join(f"# line {i}: a header shared by many requests\n" for i in range(12))
    core = make_core(model=bundled_model, max_num_seqs=4)
    metrics = EngineMetrics(core.model_name)
    with TestClient(build_app(AsyncEngine(core, metrics), metrics, server_dev_mode=True)) as dev:
        runs = []
        for reset in (False, False, True):
            if reset:
                assert dev.post("/reset_prefix_cache").status_code == 200
            r = _complete(dev, prompt=header + "def f(x):", max_tokens=8)
            runs.append((r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
                         r.json()["choices"][0]["text"]))
    assert runs[0][0] == 0 and runs[1][0] >= 16 and runs[2][0] == 0, runs
    assert runs[0][1] == runs[1][1] == runs[2][1]
    r = client.post("/reset_prefix_cache")
    assert r.status_code == 404 and "message" in r.json()["error"]
