"""vLLM's ``/tokenize``, ``/detokenize``, ``/version`` and ``return_token_ids``, on the bundled
model through the real app: the counts are the ones the completion routes use."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest

from server import routes

MODEL = "layerskip-stdlib"
CHAT = [{"role": "user", "content": "Write a function that reverses a list."}]


@pytest.fixture(scope="module")
def tokenizer(client):
    return client.app.state.engine.info.tokenizer


def test_tokenize_a_prompt_with_and_without_special_tokens(client, tokenizer):
    text = "import os\nprint(os.getcwd())"
    r = client.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == client.get("/v1/models").json()["data"][0]["max_model_len"]
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                           "return_token_strs": True}).json()
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert plain["token_strs"] == tokenizer.convert_ids_to_tokens(plain["tokens"])
    usage = client.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1,
                                                 "temperature": 0}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]


def test_tokenize_messages_counts_what_chat_completions_sends(client):
    body = client.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT,
                                                     "max_tokens": 1, "temperature": 0,
                                                     "return_token_ids": True}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]
    assert chat["prompt_token_ids"] == body["tokens"]
    bare = client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"] and body["tokens"][:bare["count"]] == bare["tokens"]


def test_detokenize_round_trips_and_keeps_special_tokens(client, tokenizer):
    text = "def f(x):\n    return x * 2\n"
    ids = client.post("/tokenize", json={"prompt": text}).json()["tokens"]
    r = client.post("/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": tokenizer.decode(ids)}
    assert text in r.json()["prompt"]
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404, "model"),
    ("/detokenize", {"tokens": [1, 4096]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [2**70]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_tokenizer_endpoint_errors_name_the_parameter(client, path, body, status, param):
    r = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}


def test_long_tokenize_bodies_are_tokenized_off_the_event_loop(client, monkeypatch):
    calls = []
    real = routes.asyncio.to_thread

    async def recording(fn, *args):
        calls.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(routes.asyncio, "to_thread", recording)
    client.post("/tokenize", json={"prompt": "x = 1\n"})
    client.post("/detokenize", json={"tokens": [5] * 10})
    assert calls == []
    long = client.post("/tokenize", json={"prompt": "x = 1\n" * 5000})
    assert long.status_code == 200 and long.json()["count"] >= 5000
    assert client.post("/detokenize", json={"tokens": [5] * 5000}).status_code == 200
    assert calls == ["tokenize", "detokenize"]


def test_version_is_the_package_version(client):
    assert client.get("/version").json() == {"version": version("layerskip-serve")}


def test_return_token_ids_gives_the_emitted_ids_whole_and_streamed(client, tokenizer):
    body = {"model": MODEL, "prompt": ["import os\n", "x = ["], "max_tokens": 8,
            "temperature": 0, "n": 2, "return_token_ids": True}
    whole = client.post("/v1/completions", json=body).json()
    for choice in whole["choices"]:
        prompt = body["prompt"][choice["index"] // 2]
        assert choice["prompt_token_ids"] == tokenizer.encode(prompt)
        assert tokenizer.decode(choice["token_ids"]) == choice["text"]
        assert 1 <= len(choice["token_ids"]) <= 8
    assert sum(len(c["token_ids"]) for c in whole["choices"]) == whole["usage"]["completion_tokens"]
    r = client.post("/v1/completions", json={**body, "stream": True})
    ids: dict[int, list] = {}
    prompts: dict[int, list] = {}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                ids.setdefault(choice["index"], []).extend(choice["token_ids"])
                if "prompt_token_ids" in choice:
                    assert choice["index"] not in prompts, "prompt ids in the first chunk only"
                    prompts[choice["index"]] = choice["prompt_token_ids"]
    assert ids == {c["index"]: c["token_ids"] for c in whole["choices"]}
    assert prompts == {c["index"]: c["prompt_token_ids"] for c in whole["choices"]}
    plain = client.post("/v1/completions", json={**body, "return_token_ids": False}).json()
    assert all("token_ids" not in c and "prompt_token_ids" not in c for c in plain["choices"])


def test_chat_return_token_ids(client, tokenizer):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 6, "temperature": 0,
            "return_token_ids": True}
    whole = client.post("/v1/chat/completions", json=body).json()
    choice = whole["choices"][0]
    assert tokenizer.decode(choice["token_ids"]) == choice["message"]["content"]
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])] == \
        choice["token_ids"]
