"""Continuous batching over integers: which sequences run this step.

Plain Python (no tensors). Waiting sequences are admitted first-come first-served while a KV
cache slot is free and the step's prompt-token budget (vLLM's ``max_num_batched_tokens``) lasts,
so a burst of long prompts cannot stall the running sequences' decoding for long; a finished
sequence leaves at once and frees its slot, so a request that arrives while others decode joins
the batch at the next step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import SlotAllocator
from engine.request import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's work: sequences to prefill, and sequences to run a decoding round for."""

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)


class Scheduler:
    """FCFS admission up to ``max_num_seqs`` running sequences (one KV slot each).

    Args:
        max_num_seqs: concurrent sequences.
        max_num_batched_tokens: prompt tokens prefilled per step (tokens); the first waiting
            sequence is admitted even when its prompt alone is longer.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int = 2048):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.slots = SlotAllocator(max_num_seqs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Admit waiting sequences while slots are free; the already running ones decode.

        Newly admitted sequences are prefilled this step and decode from the next one, so one
        step's cost stays bounded by one prefill per new request plus one round.
        """
        # In slot order, so that a batch is often a contiguous slot range (a view, not a gather).
        out = SchedulerOutput(decode=sorted(self.running, key=lambda s: s.slot))
        budget = self.max_num_batched_tokens
        while self.waiting and self.slots.can_allocate():
            if out.prefill and self.waiting[0].num_prompt_tokens > budget:
                break
            seq = self.waiting.popleft()
            budget -= seq.num_prompt_tokens
            seq.slot = self.slots.allocate()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.prefill.append(seq)
        return out

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark a sequence finished, remove it and free its slot (waiting or running)."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None

    def find(self, request_id: str) -> Sequence | None:
        """The live sequence with this id, if any."""
        for seq in list(self.running) + list(self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
