"""The self-speculative round for a batch (docs/ARCHITECTURE.md §2; LayerSkip, Elhoushi et al. 2024, §5).

With exit layer ``E`` of ``L`` and ``k`` speculations, each running sequence, whose last token
sits at position ``c = num_computed_tokens``:

1. **Draft** ``k`` tokens: the input token at position ``c + i`` runs layers ``[0, E)`` (writing
   their KV); its layer-``E`` hidden state is kept; final norm + LM head pick ``d_{i+1}``. The
   draft's head may cover only a frequent-token subset (FR-Spec,
   :meth:`models.llama.LlamaModel.set_draft_vocab`): its ``q`` is then the subset's softmax, 0
   elsewhere, and the verifier's full head keeps greedy and rejection sampling exact.
2. **Verify**: ``d_k`` runs layers ``[0, E)`` at ``c + k``; layers ``[E, L)`` then run once over the
   ``k + 1`` cached exit states (positions ``c..c+k``), writing their KV; the head gives
   ``p_0..p_k``. Drafting's KV and exit states are reused, never recomputed.
3. **Accept** with :func:`engine.sampler.accept_drafts` (greedy prefix match, rejection sampling,
   or Gumbel coupling for seeded rows): ``j`` drafts plus one token. Each row may use fewer drafts
   ``k_b ≤ k`` than the batch drafted (adaptive speculation); drafts past ``k_b`` are ignored.
4. **Roll back**: the caller sets ``num_computed_tokens = c + j + 1``; stale KV past it is masked.

Every sequence of the batch drafts in the same forward calls and keeps its own positions, mask
and ``j``. ``k = 0`` is plain autoregressive decoding through the same code, the baseline.
Cost per round in layer calls: ``k·E + E + (L − E)``; per round one host transfer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.cuda_graphs import EagerForward, GraphRunner
from engine.sampler import SamplingBatch, accept_drafts, process_logits, sample_tokens
from models.llama import BlockTables

PROMPT_LOGPROBS_CHUNK = 512  # prompt positions per log-softmax (bounds a (chunk, V) buffer)

# One token's full-model log-probability: (token id, logprob, [(top id, top logprob), ...]).
Logprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class RoundOutput:
    """What a prefill or a round gives each row.

    Attributes:
        tokens: per row the ``j + 1`` tokens it emits.
        num_accepted: per row ``j``, the drafts it accepted.
        logprobs: per row, for rows that asked, one :data:`Logprob` per emitted token (else None).
        prompt_logprobs: prefill only, when asked: one :data:`Logprob` per prompt token after
            the first.
    """

    tokens: list[list[int]]
    num_accepted: list[int]
    logprobs: list[list[Logprob] | None]
    prompt_logprobs: list[Logprob] | None = None


class _Clock:
    """Marks inside a round without host syncs: ``perf_counter`` on the CPU (synchronous), CUDA
    events on CUDA, read only after the round's host transfer has synchronised anyway."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        """Record the time now (on CUDA: when the stream reaches this point)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class SpecDecodeRunner:
    """Runs prefills and self-speculative rounds of a :class:`models.llama.LlamaModel` over a KV cache.

    After each drafting round, :attr:`last_timing` holds ``(one draft step, the verify call)`` in
    seconds (a draft step: ``E`` layers + norm + head + token choice; the verify call: the last
    draft's ``E`` layers, layers ``[E, L)`` over ``k + 1`` tokens, the head and acceptance, up to
    the host transfer); after a plain round it is None.

    ``graphs``: a :class:`engine.cuda_graphs.GraphRunner` whose buckets decode rounds run
    through (padded; replayed CUDA graphs where captured); None runs every call eagerly.
    """

    def __init__(self, model, cache, graphs: GraphRunner | None = None):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.graphs = graphs
        self.last_timing: tuple[float, float] | None = None
        self._round_kv_scratch: dict = {}  # engine.kv_cache.RoundKV's buffers, kept across rounds

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], block_tables: list[list[int]],
                sb: SamplingBatch | None = None,
                num_logprobs: list[int | None] | None = None,
                num_prompt_logprobs: list[int | None] | None = None) -> RoundOutput:
        """Run all layers on ``B`` prompts of the same length ``n``; sample each one's token at
        position ``n``. Afterwards each row's positions ``0..n−1`` hold valid KV in every layer.

        Args:
            prompts: ``B`` prompts of ``n`` tokens each.
            block_tables: each row's KV blocks (holding at least ``n`` positions).
            sb: the rows' sampling state (None: greedy).
            num_logprobs: per row, top log-probabilities to return with the sampled token.
            num_prompt_logprobs: per row, top log-probabilities to return for each prompt token
                (``prompt_logprobs`` holds the first such row's: send such rows one at a time).
        """
        m, dev = self.model, self.device
        B, n = len(prompts), len(prompts[0])
        sb = None if sb is None or sb.all_greedy_plain else sb
        ids = torch.tensor(prompts, device=dev)  # (B, n)
        positions = torch.arange(n, device=dev)[None].expand(B, n)  # (B, n)
        batch = m.attention_batch(self._tables(block_tables), positions, n)
        hidden = m.forward_layers(m.embed(ids), 0, m.num_layers, self.cache, batch)  # (B, n, D)
        out = self._finish(m.logits(hidden[:, -1:]), ids[:, :0], None, sb, None, num_logprobs)
        wanted = [r for r, k in enumerate(num_prompt_logprobs or []) if k is not None]
        if wanted:
            r = wanted[0]
            out.prompt_logprobs = self._prompt_logprobs(hidden[r, :-1], ids[r, 1:],
                                                        num_prompt_logprobs[r])
        return out

    @torch.inference_mode()
    def prefill_chunks(self, chunks: list[list[int]], starts: list[int],
                       block_tables: list[list[int]],
                       sample_rows: list[int], sb: SamplingBatch | None = None,
                       num_logprobs: list[int | None] | None = None) -> RoundOutput:
        """Chunked prefill: run all layers on ``B`` prompt chunks of any lengths in one packed
        forward call (:meth:`models.llama.LlamaModel.packed_attention_batch`).

        Args:
            chunks: row ``b``'s tokens, at positions ``starts[b]..starts[b]+len−1``; its
                positions before ``starts[b]`` already hold valid KV.
            starts: each chunk's first position.
            block_tables: each row's KV blocks (holding at least ``starts[b] + len`` positions).
            sample_rows: the rows whose chunk ends their prompt, in order: each samples its
                first token from its last position (the others only write KV).
            sb: the sample rows' sampling state (None: greedy).
            num_logprobs: per sample row, top log-probabilities to return.

        Returns: a :class:`RoundOutput` with one row per entry of ``sample_rows``.
        """
        m, dev = self.model, self.device
        lengths = [len(c) for c in chunks]
        ids = torch.tensor([t for c in chunks for t in c], device=dev)[None]  # (1, T)
        batch = m.packed_attention_batch(self._tables(block_tables), lengths, starts)
        hidden = m.forward_layers(m.embed(ids), 0, m.num_layers, self.cache, batch)  # (1, T, D)
        if not sample_rows:
            return RoundOutput([], [], [])
        ends = torch.tensor(lengths, device=dev).cumsum(0) - 1  # (B,) each row's last token
        last = hidden[0, ends[sample_rows]][:, None]  # (R, 1, D)
        sb = None if sb is None or sb.all_greedy_plain else sb
        return self._finish(m.logits(last), ids.new_empty(len(sample_rows), 0), None, sb, None,
                            num_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, next_ids: torch.Tensor, n: int) -> list:
        """``(n−1, D)`` hidden states and the ``(n−1,)`` tokens they predict → their logprobs."""
        result = []
        for lo in range(0, len(next_ids), PROMPT_LOGPROBS_CHUNK):
            logits = self.model.logits(hidden[None, lo:lo + PROMPT_LOGPROBS_CHUNK])  # (1, C, V)
            result.extend(_logprobs(logits, next_ids[None, lo:lo + PROMPT_LOGPROBS_CHUNK], n)[0])
        return result

    @torch.inference_mode()
    def decode_round(self, block_tables: list[list[int]], last_tokens: list[int],
                     num_computed: list[int],
                     exit_layer: int, k: int, sb: SamplingBatch | None = None,
                     num_speculations: list[int] | None = None,
                     num_logprobs: list[int | None] | None = None) -> RoundOutput:
        """One round for a batch of ``B`` sequences.

        Args:
            block_tables: each sequence's KV blocks, holding at least ``num_computed + k + 1``
                positions (the round writes the drafts' KV there).
            last_tokens: each sequence's last token (sampled, not yet run through the model).
            num_computed: each sequence's ``num_computed_tokens`` (the last token's position).
            exit_layer: ``E`` in ``1..L``.
            k: speculations drafted for the batch (0: plain decoding).
            sb: the rows' sampling state (None: greedy without penalties).
            num_speculations: each row's own ``k_b ≤ k`` (default ``k``).
            num_logprobs: each row's number of top logprobs, or None for no logprobs.
        """
        m, dev, L = self.model, self.device, self.model.num_layers
        fast = sb is None or sb.all_greedy_plain
        top = max(num_computed)
        forward = self._forward(block_tables, top, exit_layer, k)
        base = torch.tensor(num_computed, device=dev)[:, None]  # (B, 1)
        tok = torch.tensor(last_tokens, device=dev)[:, None]  # (B, 1)
        self.last_timing = None
        if k == 0:
            logits = forward(tok, base, top + 1, 0, L, True)  # (B, 1, V)
            return self._finish(logits, tok[:, :0], None, None if fast else sb, None,
                                num_logprobs)
        exit_states, drafts, draft_scores = [], [], []
        clock = _Clock(dev)
        clock.mark()
        for i in range(k + 1):
            hidden = forward(tok, base + i, top + i + 1, 0, exit_layer, False)  # (B, 1, D)
            exit_states.append(hidden)
            if i < k:
                if fast:
                    tok = m.draft_argmax(hidden)  # (B, 1)
                else:
                    logits = m.draft_full_logits(hidden)  # (B, 1, V), -inf off the draft vocab
                    history = torch.cat(drafts, 1) if drafts else None  # (B, i)
                    scores = process_logits(logits, sb, history, start=i)
                    draft_scores.append(scores)
                    tok = sample_tokens(scores, sb, i)
                drafts.append(tok)
                if i == k - 1:
                    clock.mark()
        positions = base + torch.arange(k + 1, device=dev)  # (B, k+1)
        logits = forward(torch.cat(exit_states, 1), positions, top + k + 1, exit_layer, L,
                         True)  # (B, k+1, V)
        out = self._finish(logits, torch.cat(drafts, 1),
                           torch.cat(draft_scores, 1) if draft_scores else None,
                           None if fast else sb, num_speculations, num_logprobs, clock)
        draft, verify = clock.intervals()
        self.last_timing = (draft / k, verify)
        return out

    def _forward(self, block_tables: list[list[int]], top: int, exit_layer: int, k: int):
        """The round's forward calls: through :attr:`graphs` (padded to buckets, replayed) when
        the round fits its buckets and, drafting, its exit layer is the captured one; else
        eager (:class:`engine.cuda_graphs.EagerForward`)."""
        g = self.graphs
        if g is not None and g.fits(len(block_tables), top + k + 1, k + 1) and (
                not k or not g.graphs or exit_layer == g.exit_layer):
            return g.begin_round(block_tables, top + k + 1)
        return EagerForward(self.model, self.cache, self._tables(block_tables),
                            exit_layer if k else 0, top + k + 1, self._round_kv_scratch)

    def _tables(self, block_tables: list[list[int]]) -> BlockTables:
        return BlockTables.build(block_tables, self.cache.block_size, self.device)

    def _finish(self, logits, drafts, draft_scores, sb, num_speculations, num_logprobs,
                clock: _Clock | None = None) -> RoundOutput:
        """Accept, then move the round's tokens (and logprobs) to the host in one transfer each
        (``clock`` is marked just before it, so a CUDA event is complete when read)."""
        target = logits if sb is None else process_logits(logits, sb, drafts, 0)
        tokens, accepted = accept_drafts(drafts, target, sb, draft_scores, num_speculations)
        if clock is not None:
            clock.mark()
        rows = torch.cat([tokens, accepted[:, None]], 1).tolist()
        logprobs: list = [None] * len(rows)
        wanted = [b for b, n in enumerate(num_logprobs or []) if n is not None]
        if wanted:
            n_top = max(num_logprobs[b] for b in wanted)
            per_row = _logprobs(logits[wanted], tokens[wanted], n_top)
            for b, row in zip(wanted, per_row):
                logprobs[b] = [(t, lp, top[:num_logprobs[b]]) for t, lp, top in row]
        return RoundOutput([r[:r[-1] + 1] for r in rows], [r[-1] for r in rows],
                           [lp[:r[-1] + 1] if lp else lp for lp, r in zip(logprobs, rows)])


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, n_top: int) -> list[list[Logprob]]:
    """Raw full-model log-probabilities: ``(B, T, V)`` logits and ``(B, T)`` tokens → per row and
    position ``(token, logprob, [(top id, top logprob)] * n_top)``."""
    logp = logits.float().log_softmax(-1)  # (B, T, V)
    chosen = logp.gather(-1, tokens[..., None])[..., 0].tolist()  # (B, T)
    top_lp, top_ids = logp.topk(n_top, -1) if n_top else (logp[..., :0], tokens[..., None][..., :0])
    top_lp, top_ids, toks = top_lp.tolist(), top_ids.tolist(), tokens.tolist()
    return [[(toks[b][t], chosen[b][t], list(zip(top_ids[b][t], top_lp[b][t])))
             for t in range(len(toks[b]))] for b in range(len(toks))]
