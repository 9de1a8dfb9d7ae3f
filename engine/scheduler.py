"""Continuous batching over integers: which sequences run this step.

Plain Python (no tensors). Waiting sequences are admitted while a KV cache slot is free and the
step's prompt-token budget (vLLM's ``max_num_batched_tokens``) lasts, so a burst of long prompts
cannot stall the running sequences' decoding for long; a finished sequence leaves at once and
frees its slot, so a request that arrives while others decode joins the batch at the next step.

Admission is fair across client requests: the sequences one HTTP request brings (several prompts,
``n`` choices) share a ``group_id``, and :class:`WaitingQueue` admits round robin by group, first
come first served within a group; requests not served yet go first, in arrival order. A request of 2 000 prompts therefore cannot hold another
client's request behind all 2 000: that one takes the next free slot (the "round robin by
request" of issue 10; vLLM's FCFS policy has no such guard).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.kv_cache import SlotAllocator
from engine.request import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's work: sequences to prefill, and sequences to run a decoding round for."""

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)


class WaitingQueue:
    """Waiting sequences, one FIFO per group (client request), served round robin by group.

    Groups never served yet go first, in arrival order (so separate one-prompt requests are
    plain FCFS); then the served ones in rotation: after :meth:`pop` a group goes to the back,
    so ``G`` groups with waiting sequences each get one admission in every ``G``. All
    operations are O(1) but :meth:`remove` (O(group size)).
    """

    def __init__(self):
        self._new: OrderedDict[str, deque[Sequence]] = OrderedDict()  # never served, FIFO
        self._served: OrderedDict[str, deque[Sequence]] = OrderedDict()  # the rotation
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Sequence]:
        for group in list(self._new.values()) + list(self._served.values()):
            yield from list(group)

    def append(self, seq: Sequence) -> None:
        """Queue ``seq`` at the back of its group (a new group: at the back of the new ones)."""
        group = self._served.get(seq.group_id)
        if group is None:
            group = self._new.setdefault(seq.group_id, deque())
        group.append(seq)
        self._len += 1

    def _head_group(self) -> OrderedDict[str, deque[Sequence]]:
        if not self._len:
            raise IndexError("the waiting queue is empty")
        return self._new if self._new else self._served

    def peek(self) -> Sequence:
        """The sequence :meth:`pop` would return.

        Raises:
            IndexError: the queue is empty.
        """
        return next(iter(self._head_group().values()))[0]

    def pop(self) -> Sequence:
        """Take the head of the group whose turn it is, and move that group to the back of the
        rotation.

        Raises:
            IndexError: the queue is empty.
        """
        groups = self._head_group()
        group_id, group = groups.popitem(last=False)
        seq = group.popleft()
        if group:
            self._served[group_id] = group
        self._len -= 1
        return seq

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out wherever it waits.

        Raises:
            ValueError: ``seq`` is not waiting.
        """
        for groups in (self._new, self._served):
            group = groups.get(seq.group_id)
            if group is not None and seq in group:
                group.remove(seq)
                if not group:
                    del groups[seq.group_id]
                self._len -= 1
                return
        raise ValueError(f"{seq.request_id} is not waiting")


class Scheduler:
    """Admission up to ``max_num_seqs`` running sequences (one KV slot each), round robin by
    client request (:class:`WaitingQueue`).

    Args:
        max_num_seqs: concurrent sequences.
        max_num_batched_tokens: prompt tokens prefilled per step (tokens); the first waiting
            sequence is admitted even when its prompt alone is longer.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int = 2048):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.slots = SlotAllocator(max_num_seqs)
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []
        self._live: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)
        self._live[seq.request_id] = seq

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
            if out.prefill and self.waiting.peek().num_prompt_tokens > budget:
                break
            seq = self.waiting.pop()
            budget -= seq.num_prompt_tokens
            seq.slot = self.slots.allocate()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.prefill.append(seq)
        return out

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark a sequence finished, remove it and free its slot (waiting or running)."""
        seq.status = status
        self._live.pop(seq.request_id, None)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:  # already gone
                pass
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None

    def find(self, request_id: str) -> Sequence | None:
        """The live sequence with this id, if any."""
        return self._live.get(request_id)
