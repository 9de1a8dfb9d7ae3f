"""The whole OpenAI surface of issue 3, through the official ``openai`` client against a live
``layerskip-serve`` on loopback: completions (every prompt form, ``n``, ``stop``, stop tokens,
``logprobs``, ``echo``, streaming with usage), sampling, per-request speculation, chat, models,
and client-side errors.

Greedy requests pass ``temperature=0`` (the API's default is OpenAI's 1.0). Speculation is turned
off per request with the extra field ``num_speculations: 0``; greedy and seeded outputs must not
change with it. Requests are short: the machine is small and shared.
"""

from __future__ import annotations

import openai
import pytest

from models.loader import BUNDLED_MODEL

MODEL = "layerskip-stdlib"
PROMPT = "def read_config(path):\n    with open(path) as f:\n        "
PROMPT_2 = "class Foo:\n"
OFF = {"num_speculations": 0}
# A deeper exit and a fixed k: rounds often accept several drafts (chunks of 3-5 tokens).
LONG_ROUNDS = {"exit_layer": 12, "num_speculations": 4}


@pytest.fixture(scope="module")
def oai(live_server):
    return openai.OpenAI(base_url=live_server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


def _greedy(oai, prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 16)
    return oai.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)


def _extra(obj, name):
    """An extension field of a client object (``spec_decode``, ``stop_reason``, ...)."""
    return (obj.model_extra or {}).get(name)


def _streamed(stream) -> tuple[dict[int, str], dict[int, str | None], list]:
    """Concatenated text and the finish reason per choice index, and every chunk."""
    texts, reasons, chunks = {}, {}, []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


@pytest.fixture(scope="module")
def reference(oai):
    """The greedy text of PROMPT with 24 tokens, its tokens and logprobs (spec on)."""
    r = _greedy(oai, max_tokens=24, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 24 and len(lp.tokens) == 24
    return r.choices[0].text, lp.tokens, lp.token_logprobs


# --- prompt forms, n ------------------------------------------------------------------------


def test_every_prompt_form_gives_the_same_text(oai, tokenizer, reference):
    text = _greedy(oai, max_tokens=24).choices[0].text
    assert text == reference[0]
    ids = tokenizer.encode(PROMPT)
    ids_2 = tokenizer.encode(PROMPT_2)
    alone_2 = _greedy(oai, PROMPT_2, max_tokens=24).choices[0].text
    for prompt in ([PROMPT, PROMPT_2], ids, [ids, ids_2]):
        r = _greedy(oai, prompt, max_tokens=24)
        assert [c.index for c in r.choices] == list(range(len(r.choices)))
        assert r.choices[0].text == text
        if len(r.choices) == 2:
            assert r.choices[1].text == alone_2
            assert r.usage.prompt_tokens == len(ids) + len(ids_2)
        else:
            assert r.usage.prompt_tokens == len(ids)


def test_n_choices_are_prompt_major_with_their_own_finish_reason(oai, reference):
    text = reference[0]
    stop = text[text.index("write"):][:5]  # in PROMPT's greedy text, not in PROMPT_2's
    assert stop not in _greedy(oai, PROMPT_2, max_tokens=12).choices[0].text
    r = _greedy(oai, [PROMPT, PROMPT_2], n=2, max_tokens=12, stop=stop)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.finish_reason for c in r.choices] == ["stop", "stop", "length", "length"]
    assert r.choices[0].text == r.choices[1].text == text[:text.index(stop)]
    # Sampled: each choice c of a prompt is the same as that prompt alone with n (seed + c).
    kw = dict(temperature=0.9, seed=11, max_tokens=8)
    both = oai.completions.create(model=MODEL, prompt=[PROMPT, PROMPT_2], n=2, **kw)
    first = oai.completions.create(model=MODEL, prompt=PROMPT, n=2, **kw)
    second = oai.completions.create(model=MODEL, prompt=PROMPT_2, n=2, **kw)
    assert [c.text for c in both.choices] == [c.text for c in first.choices + second.choices]
    assert both.choices[0].text != both.choices[1].text  # seed and seed + 1 differ
    assert both.usage.prompt_tokens == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert both.usage.completion_tokens == 4 * 8
    assert both.usage.total_tokens == both.usage.prompt_tokens + both.usage.completion_tokens


# --- stop strings, stop tokens, EOS ---------------------------------------------------------


def _tokens_through(tokens: list[str], end_char: int) -> int:
    """How many tokens it takes for their text to reach ``end_char`` characters."""
    length = 0
    for i, t in enumerate(tokens):
        length += len(t)
        if length >= end_char:
            return i + 1
    raise AssertionError("the text is shorter")


def test_stop_string_and_list_cut_the_text_and_the_usage(oai, reference):
    text, tokens, _ = reference
    assert "".join(tokens) == text
    stop = "".join(tokens[8:11])  # a multi-token stop in the middle of the text
    start = text.index(stop)
    for stops in (stop, ["never-occurs", stop], [stop, text[start + 1:start + 5]]):
        r = _greedy(oai, max_tokens=24, logprobs=0, stop=stops)
        c = r.choices[0]
        assert c.text == text[:start] and c.finish_reason == "stop"
        assert _extra(c, "stop_reason") == stop
        n = _tokens_through(tokens, start + len(stop))  # up to the token that completes the stop
        assert r.usage.completion_tokens == n == len(c.logprobs.tokens)
        assert c.logprobs.tokens == tokens[:n]
    # The stop that the text completes first wins, whatever the order of the list.
    early = text[start:start + 2]
    r = _greedy(oai, max_tokens=24, logprobs=0, stop=[stop, early])
    c = r.choices[0]
    assert c.text == text[:start] and _extra(c, "stop_reason") == early
    assert r.usage.completion_tokens == _tokens_through(tokens, start + 2) < n


def test_a_stop_completed_by_the_last_allowed_token_is_a_stop(oai, reference):
    text, tokens, _ = reference
    stop = next(s for s in ("".join(tokens[-m:]) for m in range(1, 24))
                if text.index(s) == len(text) - len(s))  # occurs only at the end
    r = _greedy(oai, max_tokens=24, stop=stop)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 24
    assert r.choices[0].text == text[:-len(stop)]


def test_a_stop_string_inside_a_chunk_of_accepted_tokens_is_cut_exactly(oai):
    """Pick a round that accepted at least two drafts, stop on its first two tokens: the rest of
    that round's tokens are neither returned nor counted, and the text ends right before it."""
    kw = dict(max_tokens=30, logprobs=0, extra_body=LONG_ROUNDS)
    whole = _greedy(oai, **kw)
    text, tokens = whole.choices[0].text, whole.choices[0].logprobs.tokens
    assert _greedy(oai, max_tokens=30, extra_body=OFF).choices[0].text == text
    rounds = [c.choices[0].logprobs.tokens for c in _greedy(oai, stream=True, **kw) if c.choices]
    assert [t for r in rounds for t in r] == tokens  # one chunk per round
    before, found = 0, None
    for chunk in rounds:
        offset = len("".join(tokens[:before]))
        stop = chunk[0] + chunk[1] if len(chunk) >= 3 else None
        if stop and stop.strip() and text.find(stop) == offset:
            found = (offset, stop, before + 2)
            break
        before += len(chunk)
    assert found, f"no round of 3+ tokens with a usable stop: {rounds}"
    offset, stop, n = found
    for extra in (LONG_ROUNDS, OFF):
        r = _greedy(oai, max_tokens=30, logprobs=0, stop=stop, extra_body=extra)
        c = r.choices[0]
        assert (c.text, c.finish_reason) == (text[:offset], "stop")
        assert r.usage.completion_tokens == n and c.logprobs.tokens == tokens[:n]
    streamed, reasons, _ = _streamed(_greedy(oai, max_tokens=30, stop=stop, stream=True,
                                             extra_body=LONG_ROUNDS))
    assert streamed == {0: text[:offset]} and reasons == {0: "stop"}


def test_stop_token_ids_finish_and_count(oai, tokenizer, reference):
    text, tokens, _ = reference
    i = next(i for i in range(4, len(tokens)) if tokens.index(tokens[i]) == i)  # first occurrence
    stop_id = tokenizer.encode(tokens[i])[0]
    assert tokenizer.decode([stop_id]) == tokens[i]
    r = _greedy(oai, max_tokens=24, logprobs=0, extra_body={"stop_token_ids": [stop_id]})
    c = r.choices[0]
    assert c.finish_reason == "stop" and _extra(c, "stop_reason") == stop_id
    assert r.usage.completion_tokens == i + 1 and c.logprobs.tokens == tokens[:i + 1]
    assert c.text.startswith("".join(tokens[:i]))


def test_stop_token_ids_text_excludes_the_stop_token(oai, tokenizer, reference):
    text, tokens, _ = reference
    i = next(i for i in range(4, len(tokens)) if tokens.index(tokens[i]) == i)
    stop_id = tokenizer.encode(tokens[i])[0]
    r = _greedy(oai, max_tokens=24, extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].text == "".join(tokens[:i])


def test_eos_and_ignore_eos(oai):
    prompt = "# 日本語のコメント\ndef f():\n"  # greedy decoding ends at once with EOS
    r = _greedy(oai, prompt, max_tokens=5, logprobs=0)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == ""
    assert r.usage.completion_tokens == 1  # EOS is counted, as OpenAI and vLLM count it
    r = _greedy(oai, prompt, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_absent_max_tokens_runs_up_to_the_context(oai, tokenizer):
    limit = _extra(oai.models.list().data[0], "max_model_len")
    assert limit == 512
    ids = (tokenizer.encode(PROMPT) * 40)[:limit - 6]
    r = oai.completions.create(model=MODEL, prompt=ids, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    r = oai.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=None,
                               extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6


# --- logprobs and echo ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5])
def test_logprobs_are_the_full_models_with_speculation_on_or_off(oai, n):
    kw = dict(max_tokens=10, logprobs=n)
    spec = _greedy(oai, extra_body={"exit_layer": 2, "num_speculations": 3}, **kw)
    plain = _greedy(oai, extra_body=OFF, **kw)
    assert _extra(spec, "spec_decode")["num_draft_tokens"] > 0
    a, b = spec.choices[0], plain.choices[0]
    assert a.text == b.text and a.logprobs.tokens == b.logprobs.tokens
    assert "".join(a.logprobs.tokens) == a.text
    assert len(a.logprobs.token_logprobs) == spec.usage.completion_tokens == 10
    for x, y in zip(a.logprobs.token_logprobs, b.logprobs.token_logprobs):
        assert abs(x - y) < 1e-5 and x <= 0
    offsets = [0]
    for t in a.logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert a.logprobs.text_offset == offsets
    lps = a.logprobs
    for token, lp, top in zip(lps.tokens, lps.token_logprobs, lps.top_logprobs):
        assert token in top and abs(top[token] - lp) < 1e-6
        assert max(n, 1) <= len(top) <= n + 1
        assert lp == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the argmax


def test_echo_without_and_with_logprobs(oai, tokenizer, reference):
    text = reference[0]
    prompt_ids = tokenizer.encode(PROMPT)
    r = _greedy(oai, max_tokens=24, echo=True)
    assert r.choices[0].text == PROMPT + text
    r = _greedy(oai, max_tokens=24, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt_ids) + 24
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == PROMPT + text
    assert lp.tokens[len(prompt_ids):] == reference[1]
    for got, want in zip(lp.token_logprobs[len(prompt_ids):], reference[2]):
        assert got == pytest.approx(want, abs=1e-5)
    assert all(len(top) <= 3 for top in lp.top_logprobs[1:])


def test_echo_with_zero_max_tokens_scores_the_prompt(oai, tokenizer, reference):
    """lm-eval's loglikelihood request: the prompt logprobs of PROMPT + generated text equal the
    generated tokens' logprobs."""
    text, tokens, logprobs = reference
    ids = tokenizer.encode(PROMPT + text)
    assert [tokenizer.decode([t]) for t in ids[-len(tokens):]] == tokens
    r = oai.completions.create(model=MODEL, prompt=PROMPT + text, max_tokens=0, echo=True,
                               logprobs=0, temperature=0)
    c = r.choices[0]
    assert c.text == PROMPT + text and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == len(ids) == len(c.logprobs.token_logprobs)
    assert c.logprobs.token_logprobs[0] is None
    for got, want in zip(c.logprobs.token_logprobs[-len(tokens):], logprobs):
        assert got == pytest.approx(want, abs=1e-4)
    ids_only = oai.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert ids_only.choices[0].text == PROMPT + text
    assert ids_only.choices[0].logprobs.token_logprobs == c.logprobs.token_logprobs


PARTIAL = [7, 2605]
"""The issue's prompt: "'" and the first two bytes of "’", which the first output token completes."""


def test_a_token_prompt_that_ends_inside_a_character_keeps_it(oai, tokenizer, make_core, bundled_model):
    """Echo plus completion equal the decoding of prompt + output, whole and streamed, with and
    without logprobs, whose tokens concatenate to the text; "’" opens the completion."""
    from tests.conftest import run_engine, tokens_of

    core = make_core(model=bundled_model, num_speculations=0)
    output = tokens_of(run_engine(core, [PARTIAL], max_tokens=8, ignore_eos=True))["r0"]
    whole = tokenizer.decode(PARTIAL + output)
    assert whole.startswith("'’") and "\ufffd" not in whole
    kw = dict(prompt=PARTIAL, max_tokens=8, extra_body={"ignore_eos": True})
    completion = _greedy(oai, **kw).choices[0].text
    assert completion == whole[1:]
    echoed = _greedy(oai, echo=True, logprobs=1, **kw).choices[0]
    assert echoed.text == whole
    lp = echoed.logprobs
    assert "".join(lp.tokens) == whole and lp.tokens[:2] == ["'", ""]
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == value  # the chosen token under its share of the text
    plain = _greedy(oai, logprobs=0, **kw).choices[0]
    assert plain.text == completion and "".join(plain.logprobs.tokens) == completion
    for echo in (False, True):
        texts, _, chunks = _streamed(_greedy(oai, stream=True, echo=echo, **kw))
        assert texts[0] == (whole if echo else completion)
        assert not any("\ufffd" in c.text for chunk in chunks for c in chunk.choices)


# --- streaming ------------------------------------------------------------------------------


def test_stream_with_include_usage(oai):
    kw = dict(prompt=[PROMPT, PROMPT_2], n=2, max_tokens=10, seed=3, temperature=0.8)
    whole = oai.completions.create(model=MODEL, **kw)
    stream = oai.completions.create(model=MODEL, stream=True,
                                    stream_options={"include_usage": True}, **kw)
    texts, reasons, chunks = _streamed(stream)
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    *body, final = chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert final.choices == [] and _counts(final.usage) == _counts(whole.usage)
    assert final.usage.completion_tokens == 40
    spec = _extra(final, "spec_decode")
    assert spec is not None and spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert all(c.id == final.id for c in chunks)


def test_stream_with_continuous_usage_stats(oai):
    stream = _greedy(oai, max_tokens=12, stream=True,
                     stream_options={"include_usage": True, "continuous_usage_stats": True})
    texts, _, chunks = _streamed(stream)
    *body, final = chunks
    counts = [c.usage.completion_tokens for c in body]
    assert counts == sorted(counts) and counts[-1] == 12 and all(n >= 1 for n in counts)
    assert all(c.usage.prompt_tokens == final.usage.prompt_tokens for c in body)
    assert final.choices == [] and final.usage.completion_tokens == 12
    without = _greedy(oai, max_tokens=12, stream=True)
    assert _streamed(without)[0] == texts
    # Without include_usage, the chunk that finishes the request carries spec_decode.
    last = list(_greedy(oai, max_tokens=12, stream=True))[-1]
    assert last.choices[0].finish_reason == "length" and _extra(last, "spec_decode")


def test_streamed_logprobs_with_echo_and_n_equal_the_whole(oai):
    kw = dict(model=MODEL, prompt=[PROMPT, "import"], n=2, temperature=0.8, seed=1, max_tokens=10,
              echo=True, logprobs=2, stop="\n")
    whole = oai.completions.create(**kw)
    got: dict[int, dict] = {}
    for chunk in oai.completions.create(stream=True, **kw):
        for c in chunk.choices:
            g = got.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [],
                                         "top_logprobs": [], "text_offset": []})
            g["text"] += c.text
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                g[key] += getattr(c.logprobs, key) if c.logprobs else []
    assert sorted(got) == [0, 1, 2, 3]
    for c in whole.choices:
        assert got[c.index]["text"] == c.text
        assert c.text.startswith(PROMPT if c.index < 2 else "import")
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            want = getattr(c.logprobs, key)
            if key == "token_logprobs":  # fp32 rounding differs with the batch a step ran in
                want = [w if w is None else pytest.approx(w, abs=1e-4) for w in want]
            elif key == "top_logprobs":
                want = [w if w is None else {t: pytest.approx(v, abs=1e-4) for t, v in w.items()}
                        for w in want]
            assert got[c.index][key] == want, (c.index, key)


@pytest.mark.parametrize("prompt,kw", [
    (PROMPT, {}),
    (PROMPT, {"stop": ["')", "abc\\"]}),
    (PROMPT, {"n": 2, "seed": 5, "temperature": 1.0}),
    ("# ü ü ü ü ü ü", {}),  # each "ö" the model writes is two byte tokens
    ("# 日本語 日本語 日本語 日本語", {}),  # the model writes byte tokens that never form a character
    ("s = 'café ü ñ 日本語'\ns = '", {"seed": 5, "temperature": 1.0}),
], ids=["plain", "stop", "n2-sampled", "two-byte-chars", "invalid-bytes", "sampled-non-ascii"])
def test_streamed_deltas_equal_the_whole_text_byte_for_byte(oai, prompt, kw):
    kw = {"temperature": 0, "max_tokens": 24, **kw}
    whole = oai.completions.create(model=MODEL, prompt=prompt, **kw)
    texts, reasons, _ = _streamed(oai.completions.create(model=MODEL, prompt=prompt, stream=True,
                                                         **kw))
    assert {i: t.encode() for i, t in texts.items()} == {c.index: c.text.encode()
                                                          for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    if prompt.startswith("# ü"):  # 24 byte tokens: C3 B6 twelve times
        assert whole.choices[0].text == "ö" * 12


@pytest.mark.parametrize("prompt", ["# ü ü ü ü ü ü", "# 日本語 日本語 日本語 日本語"])
def test_utf8_hold_back_is_bounded(oai, prompt):
    """Tokens whose bytes do not yet form a character are held back, at most
    MAX_HELD_TOKENS of them: invalid bytes cannot stall a stream."""
    from engine.detokenizer import MAX_HELD_TOKENS

    held, texts = 0, []
    for chunk in _greedy(oai, prompt, max_tokens=24, logprobs=0, stream=True):
        c = chunk.choices[0]
        held = 0 if c.text else held + len(c.logprobs.tokens)
        assert held <= MAX_HELD_TOKENS
        texts.append(c.text)
        assert "\ufffd" not in c.text or prompt.startswith("# 日")
    assert sum(1 for t in texts if t) >= 10  # text flows while the stream runs


# --- sampling -------------------------------------------------------------------------------


def test_sampling_parameters_are_accepted_and_seeds_reproduce(oai):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95,
              presence_penalty=0.5, frequency_penalty=0.3,
              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.2})
    a = oai.completions.create(seed=1234, **kw).choices[0].text
    assert oai.completions.create(seed=1234, **kw).choices[0].text == a
    others = {oai.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) >= 3  # different seeds, different text (almost surely)
    kw["extra_body"] = {**kw["extra_body"], **OFF}
    assert oai.completions.create(seed=1234, **kw).choices[0].text == a


def test_temperature_defaults_to_one(oai):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, seed=77)
    default = oai.completions.create(**kw).choices[0].text
    assert default == oai.completions.create(temperature=1.0, **kw).choices[0].text
    assert default != oai.completions.create(temperature=0, **kw).choices[0].text


def test_sampled_logprobs_are_the_full_models(oai):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.7, seed=5, logprobs=2)
    spec = oai.completions.create(extra_body={"exit_layer": 2, "num_speculations": 3}, **kw)
    plain = oai.completions.create(extra_body=OFF, **kw)
    a, b = spec.choices[0].logprobs, plain.choices[0].logprobs
    assert spec.choices[0].text == plain.choices[0].text and a.tokens == b.tokens
    assert all(abs(x - y) < 1e-5 for x, y in zip(a.token_logprobs, b.token_logprobs))


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3}])
def test_seeded_text_is_the_same_with_speculation_on_or_off_and_in_a_batch(oai, extra):
    kw = dict(model=MODEL, max_tokens=16, temperature=1.0, seed=42, presence_penalty=0.4)
    alone = oai.completions.create(prompt=PROMPT, extra_body=extra, **kw).choices[0].text
    off = oai.completions.create(prompt=PROMPT, extra_body={**extra, **OFF}, **kw).choices[0].text
    deep = oai.completions.create(prompt=PROMPT, extra_body={**extra, **LONG_ROUNDS},
                                  **kw).choices[0].text
    batch = oai.completions.create(prompt=[PROMPT_2, PROMPT, "import os\n"], extra_body=extra,
                                   **kw)
    assert alone == off == deep == batch.choices[1].text


def test_concurrent_seeded_requests_equal_the_same_requests_alone(oai):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [PROMPT, PROMPT_2, "import os\n", "x = 1\n"]

    def run(i):
        return oai.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12,
                                      temperature=0.8, seed=100 + i).choices[0].text

    alone = [run(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, range(4))) == alone


def test_greedy_ignores_top_p_and_top_k_and_penalties_act_the_same_with_speculation(oai, reference):
    r = _greedy(oai, max_tokens=24, top_p=0.1, extra_body={"top_k": 3})
    assert r.choices[0].text == reference[0]
    kw = dict(max_tokens=24, frequency_penalty=1.0, extra_body={"repetition_penalty": 1.5})
    spec = _greedy(oai, **kw).choices[0].text
    assert spec == _greedy(oai, **{**kw, "extra_body": {**kw["extra_body"], **OFF}}).choices[0].text
    assert spec != reference[0]


def test_a_tiny_temperature_is_greedy(oai, reference):
    for t in (1e-6, 1e-40, 1e-300):
        for seed in (None, 1):
            r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=t,
                                       seed=seed)
            assert r.choices[0].text == reference[0], (t, seed)


def test_best_of_equal_to_n_is_accepted(oai, reference):
    r = _greedy(oai, max_tokens=24, n=2, best_of=2)
    assert [c.text for c in r.choices] == [reference[0]] * 2


def test_top_k_at_least_the_vocabulary_keeps_every_token(oai):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=9)
    base = oai.completions.create(**kw).choices[0].text
    for k in (4096, 5000, 10**6):
        assert oai.completions.create(**kw, extra_body={"top_k": k}).choices[0].text == base


# --- per-request speculation ----------------------------------------------------------------


def test_exit_layer_and_num_speculations_per_request(oai, reference):
    text = reference[0]
    stats = {}
    for e, k in [(2, 3), (8, 3), (16, 2), (8, None), (4, 0), (8, 0)]:
        r = _greedy(oai, max_tokens=24, extra_body={"exit_layer": e, "num_speculations": k})
        assert r.choices[0].text == text, (e, k)
        stats[e, k] = _extra(r, "spec_decode")
    for e, k in [(2, 3), (8, 3), (16, 2)]:
        s = stats[e, k]
        assert 0 < s["num_draft_tokens"] and s["num_accepted_tokens"] <= s["num_draft_tokens"]
        rate = s["num_accepted_tokens"] / s["num_draft_tokens"]
        assert s["acceptance_rate"] == pytest.approx(rate)
    assert stats[16, 2]["acceptance_rate"] == 1.0  # the draft is the full model
    nothing = {"num_draft_tokens": 0, "num_accepted_tokens": 0, "acceptance_rate": None}
    for key in [(4, 0), (8, 0)]:
        assert stats[key] == nothing
    final = list(_greedy(oai, max_tokens=8, stream=True, stream_options={"include_usage": True},
                         extra_body=OFF))[-1]
    assert final.choices == [] and _extra(final, "spec_decode") == nothing


# --- chat -----------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Read a JSON file and return its keys."}]


def _chat(oai, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return oai.chat.completions.create(model=MODEL, messages=kw.pop("messages", MESSAGES), **kw)


def test_chat_whole_and_streamed(oai):
    whole = _chat(oai)
    c = whole.choices[0]
    assert whole.object == "chat.completion" and c.message.role == "assistant"
    assert c.message.content and c.finish_reason in ("stop", "length")
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert _chat(oai, extra_body=OFF).choices[0].message.content == c.message.content
    chunks = list(_chat(oai, stream=True, stream_options={"include_usage": True}))
    *body, final = chunks
    assert body[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].delta.role is None for ch in body[1:])
    assert all(ch.object == "chat.completion.chunk" and ch.usage is None for ch in body)
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == c.message.content
    assert body[-1].choices[0].finish_reason == c.finish_reason
    assert final.choices == [] and _counts(final.usage) == _counts(whole.usage)
    assert _extra(final, "spec_decode") is not None


def test_chat_n_stop_and_max_completion_tokens(oai):
    kw = dict(n=2, temperature=0.9, seed=8, max_completion_tokens=10, max_tokens=None)
    whole = _chat(oai, **kw)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.usage.completion_tokens <= 20
    texts, roles = {}, {}
    for ch in _chat(oai, stream=True, **kw):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            roles.setdefault(c.index, c.delta.role)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert roles == {0: "assistant", 1: "assistant"}
    full = _chat(oai, max_completion_tokens=16, max_tokens=None).choices[0].message.content
    stop = full[3:6]
    start = full.index(stop)
    r = _chat(oai, max_completion_tokens=16, max_tokens=None, stop=[stop])
    assert r.choices[0].message.content == full[:start] and r.choices[0].finish_reason == "stop"
    chunks = list(_chat(oai, max_completion_tokens=16, max_tokens=None, stop=[stop], stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full[:start]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs_and_top_logprobs(oai):
    spec = _chat(oai, logprobs=True, top_logprobs=3, extra_body=LONG_ROUNDS)
    plain = _chat(oai, logprobs=True, top_logprobs=3, extra_body=OFF)
    a, b = spec.choices[0].logprobs.content, plain.choices[0].logprobs.content
    assert len(a) == spec.usage.completion_tokens == len(b)
    assert "".join(t.token for t in a) == spec.choices[0].message.content
    for x, y in zip(a, b):
        assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-5
        assert len(x.top_logprobs) == 3 and x.top_logprobs[0].token == x.token
        assert x.bytes == list(x.token.encode())
    streamed = [t for ch in _chat(oai, logprobs=True, top_logprobs=3, stream=True,
                                  extra_body=LONG_ROUNDS)
                for t in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in a]
    none = _chat(oai, logprobs=True).choices[0].logprobs.content
    assert all(t.top_logprobs == [] for t in none)
    assert _chat(oai).choices[0].logprobs is None


def test_chat_text_parts_equal_a_string(oai):
    parts = [{"role": "system", "content": [{"type": "text", "text": "You write "},
                                            {"type": "text", "text": "Python."}]},
             {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]}]
    assert _chat(oai, messages=parts).choices[0].message.content == \
        _chat(oai).choices[0].message.content


# --- models and errors ----------------------------------------------------------------------


def test_models_reports_max_model_len(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert _extra(models[0], "max_model_len") == 512 and models[0].object == "model"


def test_user_and_unknown_fields_are_accepted(oai, reference):
    r = _greedy(oai, max_tokens=24, user="someone",
                extra_body={"guidellm_extension": {"a": 1}, "stop": None})
    assert r.choices[0].text == reference[0]


@pytest.mark.parametrize("kw,param", [
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"temperature": 3}, "temperature"),
    ({"logprobs": 6}, "logprobs"),
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [[1, 2, 4096]]}, "prompt"),
    ({"extra_body": {"exit_layer": 99}}, "exit_layer"),
    ({"extra_body": {"num_speculations": 99}}, "num_speculations"),
    ({"extra_body": {"stop_token_ids": [4096]}}, "stop_token_ids"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_requests_raise_bad_request_and_change_nothing(oai, reference, kw, param):
    kw = {"prompt": PROMPT, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, **kw)
    assert info.value.status_code == 400 and info.value.param == param
    assert _greedy(oai, max_tokens=24).choices[0].text == reference[0]


def test_unknown_model_and_bad_chat_are_client_errors(oai, reference):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    for kw, param in [(dict(messages=[]), "messages"),
                      (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
                      (dict(top_logprobs=2), "top_logprobs"),
                      (dict(messages=[{"role": "user", "content": [
                          {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
                       "messages")]:
        with pytest.raises(openai.BadRequestError) as info:
            _chat(oai, **kw)
        assert info.value.param == param
    assert _greedy(oai, max_tokens=24).choices[0].text == reference[0]


def _counts(usage) -> tuple[int, int, int]:
    """A usage's token counts (its prompt_tokens_details.cached_tokens differ by design when
    the same prompt was served before: the second time it comes from the prefix cache)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
