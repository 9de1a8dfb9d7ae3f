"""Continuous batching over integers: which sequences run this step, and how many tokens each.

Plain Python (no tensors). One token budget per step (vLLM's ``max_num_batched_tokens``): the
running sequences' decoding rounds are counted first, then prompt chunks fill the rest, so a long
prompt is prefilled over several steps (vLLM's chunked prefill) while the running sequences keep
decoding. A finished sequence leaves at once and frees its slot, so a request that arrives while
others decode joins the batch at the next step.

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
    """One step's work: prompt chunks to prefill, and sequences to run a decoding round for.

    Attributes:
        prefill: sequences with prompt tokens to run this step (new or part-way through).
        chunk_sizes: per ``prefill`` entry, how many prompt tokens it runs this step, starting
            at its ``num_computed_tokens``; it samples its first token when that ends the prompt.
        decode: sequences past their prompt, each running one round.
    """

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)


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
    """One token budget per step (vLLM's ``max_num_batched_tokens``): the running sequences'
    decoding rounds first, then prompt chunks fill what is left (chunked prefill), first the
    sequences part-way through their prompt, then waiting ones admitted round robin by client
    request (:class:`WaitingQueue`) while a KV slot is free.

    Args:
        max_num_seqs: concurrent sequences (one KV slot each).
        max_num_batched_tokens: tokens per step (tokens). A decoding sequence costs ``1 +
            num_lookahead_tokens``; a prompt longer than what is left runs in chunks over several
            steps. Prefill gets at least one token a step even when decoding fills the budget,
            so a waiting prompt always progresses.
        num_lookahead_tokens: draft tokens a round may add per sequence (``num_speculations``).
        prefill_whole: ``seq → bool``: sequences never chunked (those that want prompt
            logprobs); one is admitted only when it fits in what is left, or alone.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int = 2048,
                 num_lookahead_tokens: int = 0, prefill_whole=None):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {max_num_batched_tokens}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_lookahead_tokens = num_lookahead_tokens
        self.prefill_whole = prefill_whole or (lambda seq: False)
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
        """This step's decoding rounds and prompt chunks, within the token budget."""
        out = SchedulerOutput()
        prefilling = [s for s in self.running if s.num_computed_tokens < s.num_prompt_tokens]
        # In slot order, so that a batch is often a contiguous slot range (a view, not a gather).
        out.decode = sorted((s for s in self.running if s.num_computed_tokens >= s.num_prompt_tokens),
                            key=lambda s: s.slot)
        budget = self.max_num_batched_tokens - len(out.decode) * (1 + self.num_lookahead_tokens)
        budget = max(budget, 1)
        for seq in prefilling:
            budget = self._take_chunk(out, seq, budget)
            if budget <= 0:
                return out
        while self.waiting and self.slots.can_allocate() and budget > 0:
            seq = self.waiting.peek()
            if self.prefill_whole(seq) and out.prefill and seq.num_prompt_tokens > budget:
                break
            self.waiting.pop()
            seq.slot = self.slots.allocate()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget = self._take_chunk(out, seq, budget)
        return out

    def _take_chunk(self, out: SchedulerOutput, seq: Sequence, budget: int) -> int:
        """Schedule ``seq``'s next prompt chunk (all of it if it must be whole); the budget left."""
        left = seq.num_prompt_tokens - seq.num_computed_tokens
        n = left if self.prefill_whole(seq) else min(left, budget)
        out.prefill.append(seq)
        out.chunk_sizes.append(n)
        return budget - n

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
