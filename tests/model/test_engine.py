"""Engine behaviour on the bundled model: stops inside accepted chunks, aborts, failures."""

from __future__ import annotations

import asyncio

import pytest

from engine.client import AsyncEngine
from engine.request import EngineRequest, SamplingParams
from tests.conftest import run_engine, tokens_of

PROMPT = "def parse_args(argv=None):\n    parser = argparse.ArgumentParser("


@pytest.fixture(scope="module")
def cores(bundled_model, make_core):
    return (make_core(model=bundled_model, num_speculations=0),
            make_core(model=bundled_model, num_speculations=4, adaptive_speculation=False))


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 13])
def test_exactly_max_tokens_come_out(cores, max_tokens):
    plain, spec = cores
    prompt = plain.tokenizer.encode(PROMPT)
    expected = tokens_of(run_engine(plain, [prompt], 16, ignore_eos=True))["r0"][:max_tokens]
    outs = run_engine(spec, [prompt], max_tokens, ignore_eos=True)["r0"]
    assert [t for o in outs for t in o.token_ids] == expected
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == max_tokens
    assert not spec.has_work() and spec.scheduler.blocks.num_free_blocks == spec.cache.num_blocks


def test_eos_inside_an_accepted_chunk_cuts_there(cores, monkeypatch):
    plain, spec = cores
    prompt = plain.tokenizer.encode(PROMPT)
    full = tokens_of(run_engine(plain, [prompt], 24, ignore_eos=True))["r0"]
    stop_token = full[9]
    cut = full.index(stop_token) + 1
    monkeypatch.setattr(spec, "eos_token_ids", frozenset({stop_token}))
    outs = run_engine(spec, [prompt], 24)["r0"]
    got = [t for o in outs for t in o.token_ids]
    assert got == full[:cut]
    assert outs[-1].finish_reason == "stop" and outs[-1].num_output_tokens == cut
    assert all(o.finish_reason is None for o in outs[:-1])


def test_abort_frees_the_blocks(cores):
    _, spec = cores
    prompt = spec.tokenizer.encode(PROMPT)
    spec.add_request(EngineRequest("a", tuple(prompt), 50))
    spec.step()
    out = spec.abort_request("a")
    assert out.finish_reason == "abort" and not spec.has_work()
    assert spec.scheduler.blocks.num_free_blocks == spec.cache.num_blocks
    assert spec.abort_request("a") is None


def test_invalid_requests_are_refused_with_both_numbers(cores):
    _, spec = cores
    with pytest.raises(ValueError, match=rf"maximum context length is {spec.max_model_len}"):
        spec.add_request(EngineRequest("x", (1, 2, 3), spec.max_model_len))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        spec.add_request(EngineRequest("x", (1, spec.vocab_size), 4))
    with pytest.raises(ValueError, match="empty"):
        spec.add_request(EngineRequest("x", (), 4))
    assert not spec.has_work()


def test_a_failing_step_errors_its_requests_and_the_engine_keeps_serving(cores, monkeypatch):
    plain, _ = cores
    prompt = tuple(plain.tokenizer.encode(PROMPT))
    expected = tokens_of(run_engine(plain, [list(prompt)], 8))["r0"]
    engine = AsyncEngine(plain)
    real_round = plain.runner.decode_round
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real_round(*args, **kwargs)

    monkeypatch.setattr(plain.runner, "decode_round", flaky)

    async def generate(rid):
        return [o async for o in engine.generate(EngineRequest(rid, prompt, 8))]

    async def scenario():
        engine.start()
        try:
            failed = await generate("first")
            ok = await generate("second")
        finally:
            engine.shutdown()
        return failed, ok

    failed, ok = asyncio.run(scenario())
    assert failed[-1].finish_reason == "error" and "injected fault" in failed[-1].error
    assert [t for o in ok for t in o.token_ids] == expected
    assert plain.scheduler.blocks.num_free_blocks == plain.cache.num_blocks


def test_a_broken_inbox_fails_live_requests_instead_of_spinning(bundled_model, make_core, monkeypatch):
    """An error outside a step's own guard (here: in the loop's step bookkeeping) errors the
    callers, frees the live sequences, and the engine serves the next request."""
    core = make_core(model=bundled_model, num_speculations=2)
    prompt = tuple(core.tokenizer.encode(PROMPT))
    engine = AsyncEngine(core)
    real_step = engine._engine.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:  # the request has been added and prefilled; now the loop fails
            raise RuntimeError("inbox fault")
        return real_step()

    monkeypatch.setattr(engine._engine, "step", flaky)

    async def scenario():
        engine.start()
        try:
            with pytest.raises(RuntimeError, match="inbox fault"):
                [o async for o in engine.generate(EngineRequest("a", prompt, 64))]
            return [o async for o in engine.generate(EngineRequest("b", prompt, 4))]
        finally:
            engine.shutdown()

    later = asyncio.run(scenario())
    assert later[-1].finish_reason == "length" and later[-1].num_output_tokens == 4
    assert core.scheduler.blocks.num_free_blocks == core.cache.num_blocks


def test_a_request_finished_by_a_failing_step_gets_an_error_not_a_hang(cores, monkeypatch):
    plain, _ = cores
    prompt = tuple(plain.tokenizer.encode(PROMPT))
    engine = AsyncEngine(plain)

    def broken(entries):  # fails after _emit has already finished the sequence
        raise RuntimeError("injected output fault")

    monkeypatch.setattr(plain, "_logprobs", broken)

    async def scenario():
        engine.start()
        try:
            request = EngineRequest("done", prompt, 1, sampling=SamplingParams(temperature=0, logprobs=1))
            with pytest.raises(RuntimeError, match="injected output fault"):
                await asyncio.wait_for(_drain(engine.generate(request)), timeout=60)
            monkeypatch.undo()
            return await _drain(engine.generate(EngineRequest("next", prompt, 4)))
        finally:
            engine.shutdown()

    outs = asyncio.run(scenario())
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 4


async def _drain(stream) -> list:
    return [o async for o in stream]


def test_response_counts_only_emitted_drafts_while_step_stats_keep_the_verifiers(
        bundled_model, make_core, monkeypatch):
    """A full-depth draft (E = L) is always accepted: each round emits 4 drafts + 1 token. EOS
    early in a round cuts accepted drafts: the response's ``num_accepted_tokens`` counts only the
    emitted ones, the step stats (the Prometheus counters) the verifier's raw count."""
    plain = make_core(model=bundled_model, num_speculations=0)
    prompt = plain.tokenizer.encode(PROMPT)
    full = tokens_of(run_engine(plain, [prompt], 24, ignore_eos=True))["r0"]
    cut = next(i for i in range(6, 20) if full.index(full[i]) == i and (i - 1) % 5 < 3)
    core = make_core(model=bundled_model, exit_layer=plain.model.num_layers, num_speculations=4,
                     adaptive_speculation=False)
    monkeypatch.setattr(core, "eos_token_ids", frozenset({full[cut]}))
    core.add_request(EngineRequest("a", tuple(prompt), 24))
    outs, raw = [], 0
    while core.has_work():
        step_outs, stats = core.step()
        outs += step_outs
        raw += stats.num_accepted_tokens
        assert stats.num_accepted_tokens_per_pos[:1] in ([], [1])
    got = [t for o in outs for t in o.token_ids]
    assert got == full[:cut + 1]
    rounds = (cut - 1) // 5 + 1  # the last one cut after its first (cut − 1) % 5 + 1 drafts
    assert outs[-1].num_accepted_tokens == cut - (rounds - 1)  # every emitted token but bonuses
    assert raw == 4 * rounds > outs[-1].num_accepted_tokens


def test_the_bundled_draft_vocabulary_and_bad_settings(bundled_model, make_core, tmp_path):
    core = make_core(model=bundled_model, num_speculations=0)
    assert core.draft_vocab_size == 3072 == len(core.model.draft_ids)  # draft_vocab.json's N
    assert make_core(model=bundled_model, num_speculations=0, draft_vocab_size=0).model.draft_ids is None
    with pytest.raises(ValueError, match="draft_vocab_size must be in"):
        make_core(model=bundled_model, draft_vocab_size=5000)
    bad = tmp_path / "counts.json"
    bad.write_text('{"counts": [1, -2]}')
    with pytest.raises(ValueError, match="counts"):
        make_core(model=bundled_model, draft_token_counts=str(bad), draft_vocab_size=10)


def test_final_only_outputs_are_held_until_the_last_and_match_the_streamed_ones(cores):
    """vLLM's RequestOutputKind.FINAL_ONLY (non-streamed responses): the engine loop hands a
    request's outputs over only with its last one, merged into one output equal to a DELTA
    request's deltas concatenated (tokens, text, logprobs, totals); an aborted FINAL_ONLY request
    leaves nothing behind."""
    from engine.core_proc import EngineLoop
    from engine.request import RequestOutputKind

    _, spec = cores
    loop = EngineLoop(spec)
    prompt = tuple(spec.tokenizer.encode(PROMPT))
    sampling = SamplingParams(temperature=0.0, logprobs=2)
    loop.add(EngineRequest("delta", prompt, 20, ignore_eos=True, sampling=sampling))
    loop.add(EngineRequest("final", prompt, 20, ignore_eos=True, sampling=sampling,
                           output_kind=RequestOutputKind.FINAL_ONLY))
    loop.add(EngineRequest("gone", prompt, 20, ignore_eos=True,
                           output_kind=RequestOutputKind.FINAL_ONLY))
    got: dict[str, list[list]] = {"delta": [], "final": [], "gone": []}
    steps = 0
    while spec.has_work():
        deliveries, _ = loop.step()
        steps += 1
        if steps == 2:
            loop.abort("gone")
        for rid in got:
            got[rid].append([item for r, item in deliveries if r == rid])
    delta = [o for step in got["delta"] for o in step]
    final_steps = [step for step in got["final"] if step]
    assert steps > 2 and len(final_steps) == 1 and len(final_steps[0]) == 1 and len(delta) > 2
    final = final_steps[0][0]
    assert final.finished and final.finish_reason == delta[-1].finish_reason == "length"
    assert final.token_ids == [t for o in delta for t in o.token_ids] and len(final.token_ids) == 20
    assert final.text == "".join(o.text for o in delta)
    assert final.logprobs == [e for o in delta for e in o.logprobs] and len(final.logprobs) == 20
    assert (final.num_output_tokens, final.num_draft_tokens, final.num_accepted_tokens) == (
        delta[-1].num_output_tokens, delta[-1].num_draft_tokens, delta[-1].num_accepted_tokens)
    assert not any(got["gone"]) and not loop.held and not loop.added


class _FakePipe:
    """The engine process's end of the pipe: a scripted inbox; end of file when it is empty."""

    def __init__(self, inbox):
        self.inbox, self.sent = list(inbox), []

    def poll(self):
        return bool(self.inbox)

    def recv(self):
        if not self.inbox:
            raise EOFError
        return self.inbox.pop(0)

    def send(self, message):
        self.sent.append(message)


@pytest.mark.parametrize("interval", [0.0, 60.0])
def test_the_engine_process_sends_a_final_only_request_once_and_every_step_statistic(
        cores, monkeypatch, interval):
    """engine.core_proc._serve: one message carries the FINAL_ONLY request's outputs (with every
    statistic not yet sent); steps without outputs send their statistics alone only once
    STATS_INTERVAL has passed; none is lost (their generation tokens add up to the output)."""
    from engine import core_proc
    from engine.request import RequestOutputKind

    monkeypatch.setattr(core_proc, "STATS_INTERVAL", interval)
    plain, _ = cores
    prompt = tuple(plain.tokenizer.encode(PROMPT))
    pipe = _FakePipe([("add", EngineRequest("final", prompt, 40, ignore_eos=True,
                                            output_kind=RequestOutputKind.FINAL_ONLY))])
    with pytest.raises(EOFError):  # idle, the loop reads the pipe again and finds it closed
        core_proc._serve(core_proc.EngineLoop(plain), pipe)
    with_outputs = [m for m in pipe.sent if m[1]]
    assert len(with_outputs) == 1 and with_outputs[0] is pipe.sent[-1]
    outs = [item for _, item in with_outputs[0][1]]
    assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 40
    stats = [s for m in pipe.sent for s in m[2]]
    assert sum(s.num_generation_tokens for s in stats) == 40
    if interval == 0.0:  # every step's statistics at once
        assert all(len(m[2]) == 1 for m in pipe.sent) and len(pipe.sent) == len(stats)
    else:  # all held for the one message
        assert len(pipe.sent) == 1 and len(stats) > 1


def test_a_plain_request_rides_in_the_drafting_round_and_keeps_its_plain_tokens(bundled_model,
                                                                              make_core):
    """A request with ``num_speculations = 0`` next to a drafting one: on this CPU a row more
    in the drafting round costs far less than a plain round of its own (by the calibrated
    table), so each step runs one round, with both rows; the plain request's tokens are plain
    decoding's."""
    core = make_core(model=bundled_model, max_num_seqs=4)
    alone = make_core(model=bundled_model, num_speculations=0)
    prompt = alone.tokenizer.encode("def parse(self, text):\n    ")
    want = tokens_of(run_engine(alone, [prompt], 32, ignore_eos=True))["r0"]
    core.add_request(EngineRequest("plain", tuple(prompt), 32, ignore_eos=True, num_speculations=0))
    core.add_request(EngineRequest("spec", tuple(prompt), 32, ignore_eos=True))
    got, steps, rounds = [], 0, 0
    while core.has_work():
        outs, stats = core.step()
        if not stats.num_prompt_tokens:
            steps += 1
            rounds += sum(stats.rounds.values())
        got += [t for o in outs if o.request_id == "plain" for t in o.token_ids]
    assert got == want
    assert steps and rounds == steps  # one round a decode step: no separate plain round
