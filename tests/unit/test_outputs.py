"""The output loop's stops on the bundled tokenizer: stop strings across tokens and chunks, stop
tokens, the stream hold-back, and exact token counts after a cut."""

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import append_with_stops, make_output
from engine.request import EngineRequest, SamplingParams, Sequence, SequenceStatus
from models.loader import BUNDLED_MODEL

TEXT = "def read(path):\n    with open(path) as f:\n        return f.read()\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


def _run(tokenizer, chunks, max_tokens=100, **sampling):
    prompt = tuple(tokenizer.encode("# x\n"))
    seq = Sequence(EngineRequest("r", prompt, max_tokens, sampling=SamplingParams(**sampling)))
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas, kept_all = [], []
    for chunk in chunks:
        kept = append_with_stops(seq, chunk, frozenset({0}), detok)
        kept_all += kept
        deltas.append(make_output(seq, kept, detok).text)
        if seq.status.is_finished:
            break
    return seq, deltas, kept_all


def _chunks(ids, size):
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_stop_string_cuts_the_text_and_the_tokens_wherever_it_falls(tokenizer, chunk):
    ids = tokenizer.encode(TEXT)
    seq, deltas, kept = _run(tokenizer, _chunks(ids, chunk), stop=("open(pa", "zzz"))
    assert seq.status == SequenceStatus.FINISHED_STOPPED and seq.stop_reason == "open(pa"
    assert "".join(deltas) == seq.output_text == TEXT[:TEXT.index("open(pa")]
    # The token that completed the stop string is the last one kept and counted.
    n = next(i for i in range(1, len(ids) + 1) if "open(pa" in tokenizer.decode(ids[:i]))
    assert kept == ids[:n] and seq.num_output_tokens == n


def test_the_stream_holds_back_what_could_start_a_stop_string(tokenizer):
    ids = tokenizer.encode(TEXT)
    stop = "never appears here"
    prompt = tuple(tokenizer.encode("# x\n"))
    seq = Sequence(EngineRequest("r", prompt, len(ids), sampling=SamplingParams(stop=(stop,))))
    detok = IncrementalDetokenizer(tokenizer, prompt)
    sent = ""
    for token in ids:
        kept = append_with_stops(seq, [token], frozenset({0}), detok)
        sent += make_output(seq, kept, detok).text
        if not seq.status.is_finished:
            assert sent == seq.output_text[:max(0, len(seq.output_text) - (len(stop) - 1))]
    assert seq.status == SequenceStatus.FINISHED_LENGTH and sent == TEXT


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode(TEXT)
    seq, deltas, _ = _run(tokenizer, [ids], stop=("f.read", "with"))
    assert seq.stop_reason == "with" and seq.output_text == TEXT[:TEXT.index("with")]


def test_stop_token_ids_and_eos_keep_the_token_and_add_no_text(tokenizer):
    ids = tokenizer.encode(TEXT)
    seq, deltas, kept = _run(tokenizer, [ids[:4] + [0] + ids[4:]])
    assert kept == ids[:4] + [0] and seq.stop_reason is None
    assert seq.status == SequenceStatus.FINISHED_STOPPED
    seq, _, kept = _run(tokenizer, [ids], stop_token_ids=(ids[5],))
    assert kept == ids[:6] and seq.stop_reason == ids[5]


def test_max_tokens_cuts_inside_a_chunk(tokenizer):
    ids = tokenizer.encode(TEXT)
    seq, deltas, kept = _run(tokenizer, _chunks(ids, 4), max_tokens=6)
    assert kept == ids[:6] and seq.status == SequenceStatus.FINISHED_LENGTH
    assert "".join(deltas) == tokenizer.decode(ids[:6])
