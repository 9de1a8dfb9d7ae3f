"""Continuous-batching bookkeeping over integers (no model)."""

import pytest

from engine.kv_cache import BlockManager
from engine.request import EngineRequest, Sequence, SequenceStatus
from engine.scheduler import Scheduler


def _seq(i: int, prompt_len: int = 3) -> Sequence:
    return Sequence(EngineRequest(f"r{i}", tuple(range(1, prompt_len + 1)), 4))


def test_admits_fcfs_up_to_max_num_seqs_and_backfills_freed_places():
    sched = Scheduler(max_num_seqs=2, blocks=BlockManager(8, 4))
    seqs = [_seq(i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert _run(sched) == ([("r0", 3), ("r1", 3)], [])
    assert [s.block_table for s in seqs[:2]] == [[0], [1]]
    assert seqs[2].status == SequenceStatus.WAITING
    assert _run(sched) == ([], ["r0", "r1"])
    sched.finish(seqs[0], SequenceStatus.FINISHED_LENGTH)
    assert seqs[0].block_table == []
    assert _run(sched) == ([("r2", 3)], ["r1"])
    assert seqs[1].block_table == [1, 2] and seqs[2].block_table == [3]  # 0 went to the back


def test_finishing_a_waiting_sequence_removes_it():
    sched = Scheduler(max_num_seqs=1)
    a, b = _seq(0), _seq(1)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.find("r1") is b
    sched.finish(b, SequenceStatus.FINISHED_ABORTED)
    assert sched.find("r1") is None and not sched.waiting
    assert b.status.is_finished and b.status.finish_reason == "abort"


def test_status_order_puts_finished_states_last():
    live = [SequenceStatus.WAITING, SequenceStatus.RUNNING]
    done = [SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
            SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_ERROR]
    assert max(live) < min(done)
    assert not any(s.is_finished for s in live) and all(s.is_finished for s in done)


def _run(sched: Scheduler):
    """One step as the engine runs it: chunks advance ``num_computed_tokens``; a finished prompt
    gets its first token; a decoding sequence gets one. Returns ``(prefill, decode)`` as
    ``[(request_id, chunk size)]`` and ``[request_id]``."""
    out = sched.schedule()
    for seq, n in zip(out.prefill, out.chunk_sizes):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_prefill_tokens and not seq.num_output_tokens:
            seq.token_ids.append(7)
        sched.commit(seq)
    for seq in out.decode:
        seq.num_computed_tokens += 1
        seq.token_ids.append(7)
        sched.commit(seq)
    return ([(s.request_id, n) for s, n in zip(out.prefill, out.chunk_sizes)],
            [s.request_id for s in out.decode])


def test_one_token_budget_decodes_first_and_chunks_prompts_over_steps():
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    for i, n in enumerate([4, 5, 3, 20, 2]):
        sched.add(_seq(i, n))
    assert _run(sched) == ([("r0", 4), ("r1", 5), ("r2", 1)], [])
    # r0 and r1 decode (2 tokens); r2 finishes its prompt, r3 starts its 20 in chunks.
    assert _run(sched) == ([("r2", 2), ("r3", 6)], ["r0", "r1"])
    assert _run(sched) == ([("r3", 7)], ["r0", "r1", "r2"])
    assert _run(sched) == ([("r3", 7)], ["r0", "r1", "r2"])  # the budget is spent: r4 waits
    assert _run(sched) == ([("r4", 2)], ["r0", "r1", "r2", "r3"])
    for seq in sched.running:
        assert seq.num_computed_tokens <= len(seq.token_ids)


def test_a_long_prompt_never_stops_the_running_sequences():
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=8, num_lookahead_tokens=2)
    sched.add(_seq(0, 3))
    assert _run(sched) == ([("r0", 3)], [])
    sched.add(_seq(1, 50))
    steps = 0
    while sched.find("r1").num_computed_tokens < 50:
        prefill, decode = _run(sched)
        assert decode == ["r0"] and prefill == [("r1", min(5, 50 - 5 * steps))]  # 8 − (1 + 2)
        steps += 1
    assert steps == 10


def test_decoding_past_the_budget_still_gives_prefill_a_token():
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=4, num_lookahead_tokens=4)
    sched.add(_seq(0, 2))
    _run(sched)
    sched.add(_seq(1, 3))
    assert _run(sched) == ([("r1", 1)], ["r0"])


def test_a_whole_prompt_sequence_is_never_chunked():
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=5,
                      prefill_whole=lambda s: s.request_id == "r1")
    sched.add(_seq(0, 2))
    sched.add(_seq(1, 9))
    assert _run(sched) == ([("r0", 2)], [])  # r1 does not fit in the 3 left: it waits
    sched.finish(sched.find("r0"), SequenceStatus.FINISHED_LENGTH)
    assert _run(sched) == ([("r1", 9)], [])  # alone, past the budget


def _grouped(group: str, i: int) -> Sequence:
    return Sequence(EngineRequest(f"{group}-{i}", (1, 2, 3), 4, group_id=group))


def test_admission_is_round_robin_by_client_request():
    """A request of many prompts cannot hold another client's request behind all of them."""
    sched = Scheduler(max_num_seqs=2)
    big = [_grouped("big", i) for i in range(100)]
    for s in big:
        sched.add(s)
    assert [s.request_id for s in sched.schedule().prefill] == ["big-0", "big-1"]
    small = _grouped("small", 0)
    sched.add(small)
    sched.finish(big[0], SequenceStatus.FINISHED_LENGTH)
    sched.finish(big[1], SequenceStatus.FINISHED_LENGTH)
    # A new group has never been served, so it is admitted at the first free slot.
    assert [s.request_id for s in sched.schedule().prefill] == ["small-0", "big-2"]
    assert len(sched.waiting) == 97 and sched.find("big-50") is big[50]
    sched.finish(big[50], SequenceStatus.FINISHED_ABORTED)
    assert len(sched.waiting) == 96 and sched.find("big-50") is None
    assert "big-50" not in [s.request_id for s in sched.waiting]


def test_three_groups_take_turns():
    sched = Scheduler(max_num_seqs=6)
    for g in "abc":
        for i in range(3 if g == "a" else 2):
            sched.add(_grouped(g, i))
    order = [s.request_id for s in sched.schedule().prefill]
    assert order == ["a-0", "b-0", "c-0", "a-1", "b-1", "c-1"]
    assert [s.request_id for s in sched.waiting] == ["a-2"]


def test_blocks_cover_the_lookahead_and_a_rollback_gives_them_back():
    sched = Scheduler(max_num_seqs=2, num_lookahead_tokens=3, blocks=BlockManager(8, 4))
    seq = _seq(0, 3)
    sched.add(seq)
    _run(sched)  # prefill: positions 0..2 computed, its first token sampled
    assert seq.block_table == [0]
    out = sched.schedule()  # a round writes positions 3..6 (the last token and 3 drafts)
    assert out.decode == [seq] and seq.block_table == [0, 1]
    seq.num_computed_tokens += 1  # no draft accepted: back to position 4
    seq.token_ids.append(7)
    sched.commit(seq)
    assert seq.block_table == [0, 1]  # position 4 (the next input) is in block 1
    seq.num_computed_tokens -= 2  # (as if it had rolled back further) positions 0..2
    sched.commit(seq)
    assert seq.block_table == [0]


def test_when_blocks_run_out_the_newest_is_preempted_and_recomputes_first():
    sched = Scheduler(max_num_seqs=3, blocks=BlockManager(4, 4))
    old, new = _seq(0, 8), _seq(1, 8)
    sched.add(old)
    sched.add(new)
    assert _run(sched) == ([("r0", 8), ("r1", 8)], [])  # 2 blocks each: all 4 taken
    assert sched.blocks.num_free_blocks == 0
    # old's next round needs position 8: a third block; new is preempted for it.
    prefill, decode = _run(sched)
    assert decode == ["r0"] and prefill == [] and sched.num_preemptions == 1
    assert new.status == SequenceStatus.WAITING and new.block_table == []
    assert new.num_computed_tokens == 0 and new.num_prefill_tokens == 8  # its 8 prompt tokens
    assert sched.waiting.peek() is new
    sched.add(_seq(2, 2))  # a later arrival does not jump the preempted sequence
    sched.finish(old, SequenceStatus.FINISHED_LENGTH)
    prefill, _ = _run(sched)
    assert prefill[0] == ("r1", 8) and new.num_output_tokens == 1  # recomputed, no new sample


def test_a_preempted_sequence_recomputes_its_output_too():
    sched = Scheduler(max_num_seqs=2, blocks=BlockManager(3, 4))
    a, b = _seq(0, 3), _seq(1, 3)
    for s in (a, b):
        sched.add(s)
    _run(sched)
    for _ in range(2):
        _run(sched)  # both decode: a at position 5, b at 5 (blocks [0, 2] and [1] → ...)
    for _ in range(4):
        _run(sched)
    assert sched.num_preemptions >= 1
    victim = b if b.status == SequenceStatus.WAITING else a
    assert victim.num_prefill_tokens == len(victim.token_ids) - 1
