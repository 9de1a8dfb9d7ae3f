"""Continuous batching over integers: which sequences run this step, and how many tokens each.

Plain Python (no tensors). One token budget per step (vLLM's ``max_num_batched_tokens``): the
running sequences' decoding rounds are counted first, then prompt chunks fill the rest, so a long
prompt is prefilled over several steps (vLLM's chunked prefill) while the running sequences keep
decoding. A finished sequence leaves at once and gives its KV blocks back, so a request that
arrives while others decode joins the batch at the next step.

KV blocks (:class:`engine.kv_cache.BlockManager`): a decoding sequence gets the blocks of its
round's lookahead before the round, a prompt chunk those of its positions; a rollback gives back
the blocks past the accepted tokens (:meth:`Scheduler.commit`). When the blocks run out, the
newest running sequence is preempted (vLLM's recompute policy): its blocks go back, and it waits
at the head of the queue to recompute its tokens later, in cached blocks when prefix caching
kept them. The oldest running sequence therefore always progresses (the pool holds at least one
``max_model_len`` sequence; the engine checks at start-up). New sequences are admitted only into
free blocks, never by preempting; with prefix caching a new one first takes the cached blocks
of its longest cached prefix and prefills only the rest.

Admission is fair across client requests: the sequences one HTTP request brings (several prompts,
``n`` choices) share a ``group_id``, and :class:`WaitingQueue` admits round robin by group, first
come first served within a group; requests not served yet go first, in arrival order. A request
of 2 000 prompts therefore cannot hold another client's request behind all 2 000: that one takes
the next free place (the "round robin by request" of issue 10; vLLM's FCFS policy has no such
guard).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.kv_cache import BlockManager
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

    def push_front(self, seq: Sequence) -> None:
        """Queue ``seq`` first of all (a preempted sequence: vLLM puts it back at the head)."""
        group = self._served.pop(seq.group_id, None) or self._new.get(seq.group_id) or deque()
        group.appendleft(seq)
        self._new[seq.group_id] = group
        self._new.move_to_end(seq.group_id, last=False)
        self._len += 1

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
    request (:class:`WaitingQueue`) while fewer than ``max_num_seqs`` run and KV blocks are free.

    Args:
        max_num_seqs: the most sequences running at once.
        max_num_batched_tokens: tokens per step (tokens). A decoding sequence costs ``1 +`` its
            lookahead (the request's ``num_speculations``, else ``num_lookahead_tokens``); a
            prompt longer than what is left runs in chunks over several steps. Prefill gets at
            least one token a step even when decoding fills the budget, so a waiting prompt
            always progresses.
        num_lookahead_tokens: draft tokens a round may add per sequence (``num_speculations``).
        prefill_whole: ``seq → bool``: sequences never chunked (those that want prompt
            logprobs); one is admitted only when it fits in what is left, or alone. They skip the
            prefix cache (their logprobs need every prompt position's hidden state).
        blocks: the KV block manager; None: 256 blocks of 16 tokens per sequence, no prefix
            caching (for tests of the batching alone).
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int = 2048,
                 num_lookahead_tokens: int = 0, prefill_whole=None,
                 blocks: BlockManager | None = None):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {max_num_batched_tokens}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_lookahead_tokens = num_lookahead_tokens
        self.prefill_whole = prefill_whole or (lambda seq: False)
        self.blocks = blocks or BlockManager(256 * max_num_seqs, 16)
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self._live: dict[str, Sequence] = {}
        self._out = SchedulerOutput()  # the step being scheduled
        self.num_preemptions = 0  # a counter

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)
        self._live[seq.request_id] = seq

    def has_work(self) -> bool:
        """Whether any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def lookahead(self, seq: Sequence) -> int:
        """Draft tokens a round may add for ``seq``: its request's ``num_speculations``, else
        the engine's."""
        k = seq.request.num_speculations
        return self.num_lookahead_tokens if k is None else k

    def schedule(self) -> SchedulerOutput:
        """This step's decoding rounds and prompt chunks, within the token budget and the KV
        blocks (preempting the newest running sequences when a running one needs blocks)."""
        out = self._out = SchedulerOutput()
        preemptions_before = self.num_preemptions
        decoding = [s for s in self.running if s.num_computed_tokens >= s.num_prefill_tokens]
        # Every row of a round drafts the round's largest k, so each gets room for the largest.
        lookahead = max((self.lookahead(s) for s in decoding), default=0)
        for seq in decoding:
            if seq in self.running and self._reserve(seq, seq.num_computed_tokens + 1 + lookahead):
                out.decode.append(seq)
        budget = self.max_num_batched_tokens - sum(1 + self.lookahead(s) for s in out.decode)
        budget = max(budget, 1)
        for seq in [s for s in self.running if s.num_computed_tokens < s.num_prefill_tokens]:
            if seq not in self.running:  # preempted for an older one in this loop
                continue
            left = seq.num_prefill_tokens - seq.num_computed_tokens
            n = min(left, budget)
            room = self._room(seq)
            n = min(n, room) if room > 0 else n  # a shorter chunk before preempting anyone
            if self._reserve(seq, seq.num_computed_tokens + n):
                budget = self._take_chunk(out, seq, n, budget)
            if budget <= 0:
                return out
        preempted = self.num_preemptions > preemptions_before
        # After a preemption nothing is admitted this step (vLLM's rule): the blocks it freed
        # are the running sequences', and readmitting the victim at once would only thrash.
        while (not preempted and self.waiting and len(self.running) < self.max_num_seqs
               and budget > 0 and self.blocks.num_free_blocks):
            seq = self.waiting.peek()
            whole = self.prefill_whole(seq)
            if whole and out.prefill and seq.num_prompt_tokens > budget:
                break
            n = self._admit(seq, whole, budget)
            if not n:
                break
            self.waiting.pop()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget = self._take_chunk(out, seq, n, budget)
        return out

    def _admit(self, seq: Sequence, whole: bool, budget: int) -> int:
        """Give a waiting ``seq`` its cached prefix and the blocks of its first chunk; return
        the chunk's size, or 0 (nothing taken) when no block is free for it."""
        counters = self.blocks.num_queried_tokens, self.blocks.num_hit_tokens
        if not whole:
            hits = self.blocks.lookup(seq.token_ids, seq.num_prefill_tokens - 1)
            seq.block_table = hits
            seq.num_hashed_blocks = len(hits)
            seq.num_computed_tokens = len(hits) * self.blocks.block_size
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
        left = seq.num_prefill_tokens - seq.num_computed_tokens
        n = left if whole else min(left, budget, self._room(seq))
        # The sequence's likely final length, so that its blocks can be one consecutive run.
        final = len(seq.token_ids) + seq.request.max_tokens - seq.num_output_tokens \
            + self.lookahead(seq) + 1
        if n > 0 and self.blocks.grow(seq.block_table, seq.num_computed_tokens + n, final):
            return n
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = seq.num_hashed_blocks = 0
        self.blocks.num_queried_tokens, self.blocks.num_hit_tokens = counters  # asked again later
        return 0

    def _room(self, seq: Sequence) -> int:
        """Positions ``seq`` could still get without preempting: its table's spare ones plus the
        free blocks'."""
        bs = self.blocks.block_size
        return len(seq.block_table) * bs - seq.num_computed_tokens + self.blocks.num_free_blocks * bs

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s blocks to ``num_tokens`` positions, preempting the newest running
        sequences while blocks are short; False when ``seq`` itself had to be preempted."""
        while not self.blocks.grow(seq.block_table, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence out: its blocks go back, it waits first in line, and it will
        recompute its tokens (vLLM's ``PreemptionMode.RECOMPUTE``)."""
        self.running.remove(seq)
        out = self._out
        if seq in out.decode:
            out.decode.remove(seq)
        if seq in out.prefill:
            i = out.prefill.index(seq)
            del out.prefill[i], out.chunk_sizes[i]
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = seq.num_hashed_blocks = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.push_front(seq)

    def _take_chunk(self, out: SchedulerOutput, seq: Sequence, n: int, budget: int) -> int:
        """Schedule ``n`` of ``seq``'s prompt tokens; the budget left."""
        out.prefill.append(seq)
        out.chunk_sizes.append(n)
        return budget - n

    def commit(self, seq: Sequence) -> None:
        """After a step moved ``seq.num_computed_tokens``: register its newly full blocks in the
        prefix cache and give back the blocks past its next position (a rollback that crossed
        a block boundary)."""
        self.blocks.shrink(seq.block_table, seq.num_computed_tokens + 1)
        seq.num_hashed_blocks = self.blocks.cache_full_blocks(
            seq.block_table, seq.token_ids, seq.num_computed_tokens, seq.num_hashed_blocks)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark a sequence finished, remove it and give its blocks back (waiting or running)."""
        seq.status = status
        self._live.pop(seq.request_id, None)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:  # already gone
                pass
        self.blocks.free(seq.block_table)

    def find(self, request_id: str) -> Sequence | None:
        """The live sequence with this id, if any."""
        return self._live.get(request_id)
