"""Streaming detokenization never emits a broken character, and adds up to the full decode."""

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer
from models.loader import BUNDLED_MODEL

TEXTS = [
    "def naïve(x):  # café ☕ — ünïcödé\n    return x",
    "print('日本語のテキスト 🎉🐍')\n",
    "    s = \"émoji: 👩‍💻 and ∑∫√\"",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_concatenates_to_the_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "test text should split characters"
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x = 1\n"))
    deltas = [detok.add([t], final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_chunks_of_several_tokens(tokenizer, chunk):
    text = "".join(TEXTS)
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [])
    parts = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    out = "".join(detok.add(p, final=(i == len(parts) - 1)) for i, p in enumerate(parts))
    assert out == text


def test_hold_back_is_bounded(tokenizer):
    """Invalid bytes that never complete a character are released after a few tokens."""
    lone = [t for t in range(len(tokenizer)) if tokenizer.decode([t]) == "\ufffd"]
    assert lone, "the byte-level vocabulary has lone continuation bytes"
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.add([lone[0]]) for _ in range(MAX_HELD_TOKENS + 1)]
    assert "".join(deltas) != ""


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_invalid_bytes_before_a_character_do_not_corrupt_it(tokenizer, chunk):
    """Lone continuation bytes (invalid) followed by an emoji, in speculative-sized chunks."""
    lone = next(t for t in range(len(tokenizer)) if tokenizer.decode([t]) == "\ufffd")
    ids = [lone] * 6 + tokenizer.encode("😀 done")
    detok = IncrementalDetokenizer(tokenizer, [])
    parts = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    out = "".join(detok.add(p, final=(i == len(parts) - 1)) for i, p in enumerate(parts))
    assert out == tokenizer.decode(ids)
    assert out.endswith("😀 done")


def test_token_bytes_rebuild_multibyte_text_exactly():
    from transformers import AutoTokenizer

    from engine.detokenizer import TokenBytes
    from models.loader import BUNDLED_MODEL

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    token_bytes = TokenBytes(tokenizer)
    text = "é😀 naïve 日本語 \n\tdef f(): pass"
    ids = tokenizer.encode(text)
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # some tokens split a character
    assert b"".join(token_bytes(i) for i in ids) == text.encode("utf-8")


@pytest.mark.parametrize("split", range(1, 8))
def test_a_prompt_that_ends_inside_a_character_gives_it_to_the_completion(tokenizer, split):
    """Prompt and output cut anywhere in a text with split characters: the echo of the prompt
    plus the streamed deltas equal the whole decode, and no delta shows U+FFFD."""
    from engine.detokenizer import decode_whole_characters, ends_inside_character

    ids = tokenizer.encode(TEXTS[0])
    prompt, output = ids[:split], ids[split:]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add([t], final=(i == len(output) - 1)) for i, t in enumerate(output)]
    echo = decode_whole_characters(tokenizer, prompt)
    assert echo + "".join(deltas) == TEXTS[0]
    assert "\ufffd" not in echo and not any("\ufffd" in d for d in deltas)
    assert ends_inside_character(tokenizer, prompt) == tokenizer.decode(prompt).endswith("\ufffd")


def test_the_issues_prompt_7_2605_keeps_its_quote(tokenizer):
    from engine.detokenizer import decode_whole_characters, ends_inside_character

    assert tokenizer.decode([7, 2605]) == "'\ufffd" and ends_inside_character(tokenizer, [7, 2605])
    assert decode_whole_characters(tokenizer, [7, 2605]) == "'"
    rest = tokenizer.encode("’s")[1:]  # the tokens after the quote's first two bytes
    assert tokenizer.encode("’s")[0] == 2605
    detok = IncrementalDetokenizer(tokenizer, [7, 2605])
    assert "".join(detok.add([t]) for t in rest) + detok.add([], final=True) == "’s"
    # A prompt that never gets completed: the lone bytes come out as U+FFFD, once, at the end.
    detok = IncrementalDetokenizer(tokenizer, [7, 2605])
    assert detok.add(tokenizer.encode("x"), final=True) == "\ufffdx"


def test_a_real_replacement_character_is_not_a_partial_one(tokenizer):
    from engine.detokenizer import decode_whole_characters, ends_inside_character

    ids = tokenizer.encode("x = '\ufffd'")[:-1]
    assert tokenizer.decode(ids).endswith("\ufffd")
    assert not ends_inside_character(tokenizer, ids)
    assert decode_whole_characters(tokenizer, ids) == tokenizer.decode(ids)
