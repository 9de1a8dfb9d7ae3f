"""lm-evaluation-harness's ``local-completions`` model computes loglikelihoods through the server.

For a ``loglikelihood`` request, lm-eval (0.4.13, ``lm_eval/models/openai_completions.py``)
tokenizes context and continuation itself and POSTs, per batch of ``batch_size`` requests::

    {"model": ..., "prompt": [[ids of context + continuation], ...], "temperature": 0,
     "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}

It sorts ``choices`` by ``index`` and pairs them with its prompts in order; of each choice it
reads only ``logprobs.token_logprobs`` and ``logprobs.top_logprobs``, sliced
``[len(context):-1]``: so both lists must hold one entry per prompt token (the first ``null``)
plus exactly one for the generated token, even when that token is EOS. The loglikelihood is the
sum of the slice; ``is_greedy`` holds when each ``token_logprobs[i]`` equals
``max(top_logprobs[i].values())`` exactly, so both must come from the same numbers.

The test builds its own ``Instance``s (no hub dataset) and compares lm-eval's answers with the
loglikelihoods of the transformers reference implementation on the same token ids.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from models.loader import BUNDLED_MODEL
from tests.clients.conftest import require

TOLERANCE = 1e-4  # on each loglikelihood (a sum of up to 11 token logprobs), nats
TIE_MARGIN = 1e-3  # test data must not sit this close to a greedy tie (nats)

PAIRS = [
    # greedy (each continuation token is the argmax)
    ("def add(a, b):\n    return", " a.f"),
    # not greedy, eleven continuation tokens
    ("import os\nimport sys\n\n\ndef main():\n", "    parser = argparse.ArgumentParser()"),
    # empty context: lm-eval conditions on the prefix token (BOS, id 0, which is also EOS here)
    ("", "class Foo:"),
    # trailing spaces in the context: lm-eval moves them into the continuation
    ("class Stack:\n    def push(self, item):\n        ", "self.items.append(item)"),
    # greedy, and the model's next token after the continuation is EOS: the generated token
    # (max_tokens: 1) is EOS, and its logprob entry must still be returned
    ("import unittest\n\n\nclass Test(unittest.TestCase):\n    pass\n\n\n"
     "if __name__ == '__main__':\n", "    unittest.main()\n"),
    ("        raise ValueError(", "obj, name"),
]


@pytest.fixture(scope="session")  # session: checked before the server starts
def lm_eval():
    for api_dependency in ("aiohttp", "requests", "tenacity"):  # the [api] extra
        require(api_dependency, "lm-eval[api]==0.4.13")
    return require("lm_eval.models.openai_completions", "lm-eval[api]==0.4.13")


@pytest.fixture(scope="module")
def reference_model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()


def make_lm(lm_eval, url: str, **kwargs):
    return lm_eval.LocalCompletionsAPI(
        model="layerskip-stdlib", base_url=url + "/v1/completions",
        tokenizer_backend="huggingface", tokenizer=str(BUNDLED_MODEL),
        max_length=512, max_retries=1, **kwargs)


def reference_loglikelihood(model, context: list[int], continuation: list[int]):
    """``(sum of the continuation's logprobs, is_greedy, smallest margin to a greedy tie)``."""
    with torch.inference_mode():
        logits = model(torch.tensor([context + continuation])).logits[0]  # (T, V)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    total, greedy, margin = 0.0, True, float("inf")
    for i, token in enumerate(continuation):
        row = logprobs[len(context) + i - 1]  # predicts continuation[i]
        top2 = row.topk(2)
        total += float(row[token])
        if int(top2.indices[0]) == token:
            margin = min(margin, float(top2.values[0] - top2.values[1]))
        else:
            greedy = False
            margin = min(margin, float(top2.values[0] - row[token]))
    return total, greedy, margin


def run_loglikelihood(lm, pairs):
    """lm-eval's answers, and the (context ids, continuation ids) it scored for each pair."""
    from lm_eval.api.instance import Instance

    scored = {}
    inner = lm._loglikelihood_tokens

    def spy(requests, **kwargs):
        for (pair, context_ids, continuation_ids) in requests:
            scored[pair] = (context_ids, continuation_ids)
        return inner(requests, **kwargs)

    lm._loglikelihood_tokens = spy
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                 for i, pair in enumerate(pairs)]
    return lm.loglikelihood(instances, disable_tqdm=True), scored


def test_server_answers_lm_eval_request_shape(lm_eval, live_server):
    """The exact body lm-eval sends, checked field by field (clearer failures than lm-eval's)."""
    lm = make_lm(lm_eval, live_server)
    prompts = []
    for context, continuation in PAIRS[:2] + PAIRS[4:5]:
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        prompts.append(context_ids + continuation_ids)
    body = {"model": "layerskip-stdlib", "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    response = httpx.post(live_server + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(len(prompts)))
    for prompt, choice in zip(prompts, choices):
        logprobs = choice["logprobs"]
        token_logprobs, top_logprobs = logprobs["token_logprobs"], logprobs["top_logprobs"]
        assert len(token_logprobs) == len(top_logprobs) == len(prompt) + 1, (
            "echo + max_tokens 1: one entry per prompt token and one for the generated token "
            f"(EOS included); finish_reason={choice['finish_reason']}")
        assert token_logprobs[0] is None and top_logprobs[0] is None
        for value, top in zip(token_logprobs[1:], top_logprobs[1:]):
            assert isinstance(top, dict) and 1 <= len(top) <= 2
            assert value <= 0 and max(top.values()) >= value
    eos_choice = choices[-1]  # PAIRS[4]: the greedy next token is EOS
    assert eos_choice["finish_reason"] == "stop"


@pytest.mark.parametrize("batch_size, num_concurrent", [(1, 1), (3, 2)])
def test_lm_eval_loglikelihood_equals_reference(lm_eval, live_server, reference_model,
                                                batch_size, num_concurrent):
    """``batch_size`` prompts per request; ``num_concurrent`` requests in flight (aiohttp)."""
    lm = make_lm(lm_eval, live_server, batch_size=batch_size, num_concurrent=num_concurrent)
    answers, scored = run_loglikelihood(lm, PAIRS)
    assert len(answers) == len(PAIRS)
    expected = []
    for pair in PAIRS:
        total, greedy, margin = reference_loglikelihood(reference_model, *scored[pair])
        assert margin > TIE_MARGIN, f"test data {pair!r} is within {margin:.1e} of a greedy tie"
        expected.append((total, greedy))
    assert {greedy for _, greedy in expected} == {True, False}, "the data should cover both"
    for pair, (got, got_greedy), (want, want_greedy) in zip(PAIRS, answers, expected):
        assert got == pytest.approx(want, abs=TOLERANCE), pair
        assert got_greedy == want_greedy, pair
