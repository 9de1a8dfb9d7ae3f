"""The OpenAPI document tells the truth (error responses, media types, no 422s, ``Allow`` on a
405), and the caps on what one request may cost the others (``stop_token_ids``, stop strings,
``n`` × prompts)."""

from __future__ import annotations

import pytest

from server.protocol import MAX_CHOICES, MAX_STOP_STRING_CHARS, MAX_STOP_TOKEN_IDS

MODEL = "layerskip-stdlib"
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def doc(client):
    return client.get("/openapi.json").json()


def _responses(doc, path, method):
    return doc["paths"][path][method]["responses"]


@pytest.mark.parametrize("path, statuses", [
    ("/v1/completions", ("400", "404", "413", "503")),
    ("/v1/chat/completions", ("400", "404", "413", "503")),
    ("/tokenize", ("400", "404", "413")),
    ("/detokenize", ("400", "404", "413")),
])
def test_error_responses_use_the_error_schema_and_no_422_is_claimed(doc, path, statuses):
    responses = _responses(doc, path, "post")
    for status in statuses:
        assert responses[status]["content"]["application/json"]["schema"] == ERROR_REF, status
    assert "422" not in responses
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error = doc["components"]["schemas"]["ErrorInfo"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


def test_streams_and_metrics_have_their_media_types(doc):
    for path in ("/v1/completions", "/v1/chat/completions"):
        content = _responses(doc, path, "post")["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
    assert set(_responses(doc, "/metrics", "get")["200"]["content"]) == {"text/plain"}
    assert set(_responses(doc, "/health", "get")) == {"200", "503"}


def test_the_documented_schemas_match_real_responses(client, doc):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    registry = Registry().with_resource("urn:doc", Resource.from_contents(
        {**doc, "$schema": "https://json-schema.org/draft/2020-12/schema"}))
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                              "temperature": 0, "return_token_ids": True})
    missing = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    tokens = client.post("/tokenize", json={"prompt": "x", "return_token_strs": True})
    for response, path, status in ((ok, "/v1/completions", "200"),
                                   (missing, "/v1/completions", "404"),
                                   (tokens, "/tokenize", "200")):
        assert response.status_code == int(status)
        ref = _responses(doc, path, "post")[status]["content"]["application/json"]["schema"]
        schema = {"$ref": "urn:doc" + ref["$ref"]}
        Draft202012Validator(schema, registry=registry).validate(response.json())


def test_a_405_carries_allow(client):
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.post("/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def _refused(client, body, param):
    r = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    return r.json()["error"]["message"]


def test_stop_token_ids_are_capped(client):
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1,
                                              "stop_token_ids": [5] * MAX_STOP_TOKEN_IDS})
    assert ok.status_code == 200, ok.text
    message = _refused(client, {"prompt": "x", "stop_token_ids": [5] * (MAX_STOP_TOKEN_IDS + 1)},
                       "stop_token_ids")
    assert str(MAX_STOP_TOKEN_IDS) in message


def test_stop_strings_are_capped_in_number_and_length(client):
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1,
                                              "stop": ["a" * MAX_STOP_STRING_CHARS] * 4})
    assert ok.status_code == 200, ok.text
    assert "4" in _refused(client, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop")
    message = _refused(client, {"prompt": "x", "stop": "a" * (MAX_STOP_STRING_CHARS + 1)}, "stop")
    assert str(MAX_STOP_STRING_CHARS) in message
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
        "stop": ["b" * (MAX_STOP_STRING_CHARS + 1)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


def test_choices_are_capped_at_n_times_prompts(client):
    message = _refused(client, {"prompt": ["x"] * (MAX_CHOICES // 2 + 1), "n": 2}, "n")
    assert f"{MAX_CHOICES}" in message and f"2 × {MAX_CHOICES // 2 + 1}" in message
    _refused(client, {"prompt": [[5]] * (MAX_CHOICES + 1)}, "prompt")
    ok = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 1, "temperature": 0,
                                              "prompt": [[5, 6]] * 4, "n": 16})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 64
