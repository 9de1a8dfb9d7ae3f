"""The engine core: ``step() = schedule → run → update → emit`` (docs/ARCHITECTURE.md §1).

:class:`EngineCore` is synchronous and single-threaded; :mod:`engine.client` runs it in its own
thread. Tests drive it directly, step by step.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

from engine.config import (DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_MAX_MODEL_LEN_CAP,
                           DEFAULT_NUM_SPECULATIONS,
                           MAX_NUM_SPECULATIONS, EngineConfig)
from engine.cuda_graphs import GraphRunner
from engine.detokenizer import IncrementalDetokenizer, TokenBytes
from engine.kv_cache import BlockManager, KVCache, blocks_for, bytes_per_block
from engine.outputs import append_with_stops, make_output
from engine.processor import (EngineInfo, apply_chat_template, check_prompt, check_request,
                              max_token_chars)
from engine.request import (EngineRequest, InvalidRequestError, RequestOutput, Sequence,
                            SequenceStatus, TokenLogprob)
from engine.sampler import SamplingBatch
from engine.scheduler import Scheduler
from engine.spec_decode import RoundOutput, SpecDecodeRunner
from engine.speculation import SpeculationController, SpecState
from engine.stats import FinishedStats, StepStats  # noqa: F401  (re-exported)
from models.draft_vocab import DRAFT_VOCAB_FILE, coverage, load_counts, top_tokens
from models.loader import load_checkpoint, read_config

logger = logging.getLogger(__name__)


class EngineCore:
    """Loads the checkpoint, owns the KV cache and the scheduler, and runs steps.

    Raises (at construction):
        models.loader.CheckpointError: the checkpoint cannot be served.
        ValueError: an exit layer, speculation count or ``max_num_seqs`` out of range, or CUDA
            asked for but absent.
    """

    def __init__(self, config: EngineConfig):
        torch.manual_seed(config.seed)
        self.config = config
        if config.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {config.max_num_seqs}")
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} was asked for but no CUDA device is available")
        hf_config = read_config(config.model)
        self.max_model_len = _max_model_len(config, hf_config.max_position_embeddings)
        cache_len = self.max_model_len + MAX_NUM_SPECULATIONS + 1  # one round's drafts past the end
        ck = load_checkpoint(config.model, config.device, config.dtype, rope_len=cache_len)
        self.model, self.tokenizer = ck.model, ck.tokenizer
        gen_cfg, L = ck.generation_config, self.model.num_layers
        self.generation_config = gen_cfg
        self.exit_layer = _pick(config.exit_layer, gen_cfg.get("assistant_early_exit"), max(1, L // 4))
        if config.exit_layer is None and gen_cfg.get("assistant_early_exit") is None:
            logger.warning(
                "%s: its generation_config.json has no assistant_early_exit, so the exit layer "
                "falls back to L/4 = %d of %d layers; pass --exit-layer to choose one (a "
                "checkpoint not trained for early exits drafts poorly at any layer)",
                config.model, self.exit_layer, L)
        self.num_speculations = _pick(config.num_speculations, gen_cfg.get("num_assistant_tokens"),
                                      DEFAULT_NUM_SPECULATIONS)
        if not 1 <= self.exit_layer <= L:
            raise ValueError(f"exit_layer must be in 1..{L}, got {self.exit_layer}")
        if not 0 <= self.num_speculations <= MAX_NUM_SPECULATIONS:
            raise ValueError(f"num_speculations must be in 0..{MAX_NUM_SPECULATIONS}, "
                             f"got {self.num_speculations}")
        self.eos_token_ids = _eos_ids(gen_cfg, self.tokenizer)
        self.draft_vocab_size = self._set_draft_vocab()
        s = self.model.shape
        num_blocks = self._num_kv_blocks(cache_len)
        self.use_cuda_graphs = self.model.device.type == "cuda" and not config.enforce_eager
        self.cache = KVCache(L, num_blocks, config.block_size, s.num_kv_heads, s.head_dim,
                             self.model.dtype, self.model.device,
                             scratch_block=self.use_cuda_graphs)
        self.runner = SpecDecodeRunner(self.model, self.cache, self._capture_graphs(cache_len))
        self.policy = SpeculationController(L, self.exit_layer, config.adaptive_speculation)
        self._round_seconds = 0.0  # time inside decode rounds during the current step
        if config.adaptive_speculation and self.num_speculations:
            self._calibrate()
        self.generator = torch.Generator(device=self.model.device).manual_seed(config.seed)
        self._token_text = functools.lru_cache(maxsize=1 << 16)(
            lambda i: self.tokenizer.decode([i], clean_up_tokenization_spaces=False))
        self._token_bytes = functools.lru_cache(maxsize=1 << 16)(TokenBytes(self.tokenizer))
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens,
                                   self.num_speculations, _wants_prompt_logprobs,
                                   BlockManager(num_blocks, config.block_size,
                                                config.enable_prefix_caching))
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._counted = (0, 0, 0)  # the cache counters as last reported (_count_cache)
        self._finished_outside_steps: list[FinishedStats] = []
        self.model_name = config.served_model_name or Path(config.model).name.removesuffix(".gguf")
        logger.info("engine ready: %d layers, exit_layer=%d, num_speculations=%d, "
                    "max_model_len=%d, KV cache %d blocks x %d tokens = %d tokens (%.1f "
                    "max_model_len sequences), %d bytes (%.1f MiB), prefix caching %s",
                    L, self.exit_layer, self.num_speculations, self.max_model_len, num_blocks,
                    config.block_size, num_blocks * config.block_size,
                    num_blocks * config.block_size / cache_len, self.cache.nbytes,
                    self.cache.nbytes / 2**20, "on" if config.enable_prefix_caching else "off")

    def _set_draft_vocab(self) -> int:
        """FR-Spec: restrict the draft's head to the most frequent tokens of the configured (or
        the checkpoint's ``draft_vocab.json``) counts, EOS always kept; return its size.

        Raises:
            ValueError: a size out of ``0..V``, a size without counts, or a bad counts file.
        """
        cfg, V = self.config, self.model.shape.vocab_size
        path, size = cfg.draft_token_counts, cfg.draft_vocab_size
        shipped = Path(cfg.model) / DRAFT_VOCAB_FILE
        if path is None and shipped.is_file():
            path = str(shipped)
        if size is not None and not 0 <= size <= V:
            raise ValueError(f"draft_vocab_size must be in 0..{V}, got {size}")
        if size and path is None:
            raise ValueError("draft_vocab_size needs token counts (draft_token_counts)")
        if path is None or size == 0:
            return V
        counts, shipped_size = load_counts(path)
        size = size or shipped_size
        if not size:
            return V
        ids = top_tokens(counts, size, V, self.eos_token_ids)
        self.model.set_draft_vocab(ids)
        logger.info("draft vocabulary: %d of %d tokens (%s, %.1f %% of its counted tokens)",
                    len(ids), V, path, 100 * coverage(counts, ids))
        return len(ids)

    def _num_kv_blocks(self, cache_len: int) -> int:
        """KV blocks from the memory budget: ``kv_cache_memory_bytes``; else on CUDA
        ``gpu_memory_utilization`` of the device's memory less what is allocated now (vLLM's
        rule); else on the CPU what ``max_num_seqs`` sequences of ``max_model_len`` need, at
        most :data:`DEFAULT_CPU_KV_CACHE_BYTES`.

        Raises:
            ValueError: the budget cannot hold one sequence of ``max_model_len`` tokens (plus a
                round's lookahead), or the block size or utilisation is out of range.
        """
        cfg, s = self.config, self.model.shape
        if cfg.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {cfg.block_size}")
        per_block = bytes_per_block(s.num_layers, cfg.block_size, s.num_kv_heads, s.head_dim,
                                    self.model.dtype)
        per_seq = blocks_for(cache_len, cfg.block_size)
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.model.device.type == "cuda":
            if not 0 < cfg.gpu_memory_utilization <= 1:
                raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                                 f"{cfg.gpu_memory_utilization}")
            total = torch.cuda.get_device_properties(self.model.device).total_memory
            budget = int(cfg.gpu_memory_utilization * total) - torch.cuda.memory_reserved()
        else:
            budget = min(cfg.max_num_seqs * per_seq * per_block, DEFAULT_CPU_KV_CACHE_BYTES)
        num_blocks = max(budget, 0) // per_block
        if num_blocks < per_seq:
            raise ValueError(
                f"the KV cache budget of {budget} bytes holds {num_blocks} blocks of "
                f"{cfg.block_size} tokens, but one sequence of max_model_len "
                f"{self.max_model_len} (plus a round's drafts) needs {per_seq} blocks = "
                f"{per_seq * per_block} bytes: raise --kv-cache-memory-bytes (or "
                "--gpu-memory-utilization) or lower --max-model-len")
        return num_blocks

    def _capture_graphs(self, cache_len: int) -> GraphRunner | None:
        """On CUDA without ``enforce_eager``: capture the decode-time graphs for every batch
        bucket up to ``max_num_seqs``, every key bucket up to ``cache_len`` and every ``k`` up
        to ``num_speculations`` at the engine's exit layer (:mod:`engine.cuda_graphs`, which
        estimates the cost); else None (every call eager)."""
        if not self.use_cuda_graphs:
            return None
        k_max = self.num_speculations
        graphs = GraphRunner(self.model, self.cache, self.config.max_num_seqs, cache_len,
                             k_max + 1, capture=True)
        graphs.capture(self.exit_layer, list(range(1, k_max + 1)))
        return graphs

    def _calibrate(self) -> None:
        """Seed the controller's cost table with timed dummy rounds (no block is in use yet,
        and stale KV is masked until overwritten, so they leave nothing behind)."""
        n = self.config.max_num_seqs
        sizes = sorted({b for b in (n, *(1 << i for i in range(7))) if b <= min(n, 64)})
        pos, E = min(32, self.max_model_len - 1), self.exit_layer
        nb = blocks_for(pos + self.num_speculations + 1, self.config.block_size)
        tables = [[(r * nb + j) % self.cache.num_blocks for j in range(nb)] for r in range(64)]

        def time_round(B: int, k: int):
            start = time.perf_counter()
            self.runner.decode_round(tables[:B], [0] * B, [pos] * B, E, k)
            return (time.perf_counter() - start, *(self.runner.last_timing or (None, None)))

        start = time.perf_counter()
        self.policy.calibrate(time_round, sizes, E, self.num_speculations)
        logger.info("speculation costs calibrated in %.2f s (batch sizes %s, k 0..%d)",
                    time.perf_counter() - start, sizes, self.num_speculations)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table (token ids must be below it)."""
        return self.model.shape.vocab_size

    def validate(self, prompt_token_ids, max_tokens: int) -> None:
        """Check a prompt and ``max_tokens`` against the model's limits
        (:func:`engine.processor.check_prompt`).

        Raises:
            InvalidRequestError: see :func:`engine.processor.check_prompt`.
        """
        check_prompt(prompt_token_ids, max_tokens, self.vocab_size, self.max_model_len)

    def validate_request(self, request: EngineRequest) -> None:
        """:meth:`validate`, plus the speculation extras and ``stop_token_ids``
        (:func:`engine.processor.check_request`).

        Raises:
            InvalidRequestError: a value out of range, naming the parameter.
        """
        check_request(request, self.vocab_size, self.max_model_len, self.model.num_layers)

    @property
    def default_sampling(self) -> dict:
        """The sampling defaults the checkpoint's generation config sets (vLLM's behaviour)."""
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        return {k: self.generation_config[k] for k in keys if self.generation_config.get(k) is not None}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> list[int]:
        """Render ``messages`` with the tokenizer's chat template and tokenize
        (:func:`engine.processor.apply_chat_template`).

        Raises:
            InvalidRequestError: no chat template, or the template refused the messages.
        """
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt)

    def info(self) -> EngineInfo:
        """What the API side needs to know of the served model (picklable, tokenizer included)."""
        return EngineInfo(self.model_name, self.config.model, self.max_model_len, self.vocab_size,
                          self.model.num_layers, self.default_sampling, self.tokenizer,
                          max_token_chars(self.tokenizer), self.cache.nbytes,
                          torch.get_num_threads() if self.model.device.type == "cpu" else None,
                          str(self.model.device), str(self.model.dtype).removeprefix("torch."),
                          self.exit_layer, self.config.max_num_seqs,
                          self.config.max_waiting_requests)

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request (validated with :meth:`validate_request`; raises its ``ValueError``)."""
        self.validate_request(request)
        seq = Sequence(request)
        seq.spec = SpecState()
        self.detokenizers[seq.request_id] = IncrementalDetokenizer(self.tokenizer,
                                                                   request.prompt_token_ids)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        """Finish a live request now (``abort``, or ``error`` with a message); None if unknown."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        status = SequenceStatus.FINISHED_ERROR if error else SequenceStatus.FINISHED_ABORTED
        self.scheduler.finish(seq, status)
        self._finished_outside_steps.append(_finished_stats(seq, time.monotonic()))
        return make_output(seq, [], self.detokenizers.pop(request_id), error=error)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block no running sequence holds (vLLM's
        ``reset_prefix_cache``): later prompts are prefilled from scratch, except for the blocks
        of sequences still running (those stay cached). For benchmarks that repeat their prompts,
        so that each arm starts with the cache cold."""
        self.scheduler.blocks.reset_prefix_cache()

    def is_live(self, request_id: str) -> bool:
        """Whether the request waits or runs."""
        return self.scheduler.find(request_id) is not None

    def has_work(self) -> bool:
        """Whether a request waits or runs."""
        return self.scheduler.has_work()

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        """Schedule within the token budget, run the step's prompt chunks in one packed call
        and one round for the decoding sequences, emit outputs."""
        start = time.perf_counter()
        self._round_seconds = 0.0
        sched = self.scheduler.schedule()
        admitted = time.monotonic()
        for seq in sched.prefill:
            seq.scheduled_time = admitted
        stats = self.queue_stats()
        results: list[tuple[Sequence, RoundOutput, int]] = []
        chunks = [(s, n) for s, n in zip(sched.prefill, sched.chunk_sizes)
                  if not _wants_prompt_logprobs(s)]
        if chunks:
            results.extend(self._prefill_chunks(chunks, stats))
        for seq in sched.prefill:
            if _wants_prompt_logprobs(seq):  # whole and alone: its logprobs need every position
                sampling = seq.request.sampling
                out = self.runner.prefill([seq.token_ids], [seq.block_table],
                                          self._sampling([seq]),
                                          [sampling.logprobs], [sampling.prompt_logprobs])
                seq.num_computed_tokens = seq.num_prompt_tokens
                self.scheduler.commit(seq)
                stats.num_prompt_tokens += seq.num_prompt_tokens
                results.append((seq, out, 0))
        if sched.decode:
            results.extend(self._decode(sched.decode, stats))
        outputs = [self._emit(seq, out, row, stats) for seq, out, row in results]
        if sched.decode and not sched.prefill:
            self.policy.observe_step(len(sched.decode),
                                     time.perf_counter() - start - self._round_seconds,
                                     _sampled(sched.decode))
        self._count_cache(stats)
        return outputs, stats

    def queue_stats(self) -> StepStats:
        """Stats of no work done: the running and waiting counts and KV usage (for the
        gauges), and the requests aborted or failed since the last stats (for
        ``request_success_total``)."""
        stats = StepStats(finished=self._finished_outside_steps)
        self._finished_outside_steps = []
        return self._count_cache(stats)

    def _count_cache(self, stats: StepStats) -> StepStats:
        """The queue gauges and the KV cache counters' growth since they were last counted."""
        sched, blocks = self.scheduler, self.scheduler.blocks
        stats.num_running, stats.num_waiting = len(sched.running), len(sched.waiting)
        stats.kv_cache_usage = blocks.usage
        now = (blocks.num_queried_tokens, blocks.num_hit_tokens, sched.num_preemptions)
        queries, hits, preemptions = (a - b for a, b in zip(now, self._counted))
        stats.num_prefix_cache_queries += queries
        stats.num_prefix_cache_hits += hits
        stats.num_preemptions += preemptions
        self._counted = now
        return stats

    def _prefill_chunks(self, chunks: list[tuple[Sequence, int]], stats: StepStats):
        """Every ``(sequence, chunk size)`` of the step in one packed forward call; the
        sequences whose chunk ends their prompt sample their first token."""
        seqs = [s for s, _ in chunks]
        # A preempted sequence recomputing its tokens has its next token already: no sample.
        done = [r for r, (s, n) in enumerate(chunks)
                if s.num_computed_tokens + n == s.num_prefill_tokens and not s.num_output_tokens]
        finishing = [seqs[r] for r in done]
        out = self.runner.prefill_chunks(
            [s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n] for s, n in chunks],
            [s.num_computed_tokens for s in seqs], [s.block_table for s in seqs], done,
            self._sampling(finishing) if finishing else None,
            [s.request.sampling.logprobs for s in finishing])
        for seq, n in chunks:
            seq.num_computed_tokens += n
            self.scheduler.commit(seq)
            stats.num_prompt_tokens += n
        return [(seq, out, row) for row, seq in enumerate(finishing)]

    def _sampling(self, seqs: list[Sequence]) -> SamplingBatch | None:
        """The rows' sampling state (None when all are greedy without penalties: raw argmax);
        each row's first logits predict position ``num_computed_tokens + 1`` (the prompt length
        at prefill)."""
        if all(s.request.sampling.greedy and not s.request.sampling.has_penalties for s in seqs):
            return None
        return SamplingBatch.build(
            [s.request.sampling for s in seqs], [s.request.sampling.seed or 0 for s in seqs],
            [max(s.num_computed_tokens + 1, s.num_prompt_tokens) for s in seqs],
            [s.token_ids[:s.num_prompt_tokens] for s in seqs], [s.output_token_ids for s in seqs],
            self.vocab_size, self.model.device, self.generator)

    def _plan(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's ``k`` this round: the request's own, else the controller's (planned
        per exit layer: the request's, else the engine's); never more drafts than it may still
        emit (a round gives ``k + 1`` tokens)."""
        ks = [0] * len(seqs)
        by_exit: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            if seq.request.num_speculations is not None:
                ks[i] = self._room(seq, seq.request.num_speculations)
            else:
                by_exit.setdefault(seq.request.exit_layer or self.exit_layer, []).append(i)
        for exit_layer, rows in by_exit.items():
            planned = self.policy.plan([seqs[i].spec for i in rows],
                                       [self._room(seqs[i], self.num_speculations) for i in rows],
                                       exit_layer, self.num_speculations,
                                       _sampled([seqs[i] for i in rows]))
            for i, k in zip(rows, planned):
                ks[i] = k
        return ks

    @staticmethod
    def _room(seq: Sequence, k: int) -> int:
        """``k``, but no more drafts than the sequence may still emit (a round gives k + 1)."""
        return max(0, min(k, seq.request.max_tokens - seq.num_output_tokens - 1))

    def _decode(self, seqs: list[Sequence], stats: StepStats):
        """One round per group: the plain sequences together, the drafting ones by exit layer
        (the group drafting the largest ``k`` any of its sequences has). The plain sequences
        join the largest drafting group instead when the cost table prices that round below the
        two (:meth:`engine.speculation.SpeculationController.merge_pays`), those of its exit
        layer: a row with no room left, or one its request keeps plain, uses none of the drafts;
        one the controller chose plain may use them (they cost nothing more)."""
        ks = self._plan(seqs)
        groups: dict[int | None, list[int]] = {}
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            groups.setdefault((seq.request.exit_layer or self.exit_layer) if k else None,
                              []).append(i)
        drafting = [e for e in groups if e is not None]
        if None in groups and drafting:  # plain rows ride in a drafting round when cheaper
            e = max(drafting, key=lambda e: len(groups[e]))
            riders = [i for i in groups[None]
                      if (seqs[i].request.exit_layer or self.exit_layer) == e]
            if riders and self.policy.merge_pays(e, len(groups[e]), len(riders),
                                                 max(ks[i] for i in groups[e]), _sampled(seqs)):
                groups[e] += riders
                groups[None] = [i for i in groups[None] if i not in riders]
                if not groups[None]:
                    del groups[None]
        results = []
        for exit_layer, members in groups.items():
            results += self._round(exit_layer, [seqs[i] for i in members],
                                   [ks[i] for i in members], stats)
        return results

    def _round(self, exit_layer: int | None, group: list[Sequence], ks: list[int],
               stats: StepStats):
        """Run one group's round, time it for the controller, and move each row's KV length.

        The group drafts its largest k for every row; a row whose k the controller chose may use
        all of those drafts (free, and exact for any k fixed before drafting) up to what it may
        still emit. A k the request fixed is kept.
        """
        if exit_layer:
            ks = [k if s.request.num_speculations is not None else self._room(s, max(ks))
                  for s, k in zip(group, ks)]
        k = max(ks)
        started = time.perf_counter()
        out = self.runner.decode_round(
            [s.block_table for s in group], [s.token_ids[-1] for s in group],
            [s.num_computed_tokens for s in group], exit_layer or self.exit_layer, k,
            self._sampling(group), ks, [s.request.sampling.logprobs for s in group])
        seconds = time.perf_counter() - started
        self._round_seconds += seconds
        E = (exit_layer or self.exit_layer) if k else 0
        self.policy.observe_round(E, len(group), k, seconds,
                                  *(self.runner.last_timing or (None, None)), _sampled(group))
        stats.rounds[(E, k)] = stats.rounds.get((E, k), 0) + 1
        if k and E == self.exit_layer:
            stats.draft_verify_cost_ratio = self.policy.costs.cost_ratio(E, len(group), k)
        per_pos, examined = stats.num_accepted_tokens_per_pos, stats.num_examined_per_pos
        per_pos += [0] * (k - len(per_pos))
        examined += [0] * (k - len(examined))
        results = []
        for row, (seq, k_row) in enumerate(zip(group, ks)):
            j = out.num_accepted[row]
            seq.num_computed_tokens += j + 1  # rollback: drafts past j are stale and masked
            self.scheduler.commit(seq)  # and the blocks past the accepted tokens go back
            self.policy.observe(seq.spec, k_row, j)
            if k_row:
                seq.num_drafts += 1
                seq.num_draft_tokens += k_row
                stats.num_drafts += 1
                stats.num_draft_tokens += k_row
                stats.num_accepted_tokens += j
                for i in range(min(j + 1, k_row)):
                    examined[i] += 1
                    per_pos[i] += i < j
            results.append((seq, out, row))
        return results

    def _emit(self, seq: Sequence, out: RoundOutput, row: int, stats: StepStats) -> RequestOutput:
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        detok = self.detokenizers[seq.request_id]
        tokens = out.tokens[row] if seq.request.max_tokens > 0 else []
        kept = append_with_stops(seq, tokens, self.eos_token_ids, detok)
        seq.num_accepted_tokens += min(out.num_accepted[row], len(kept))  # drafts emitted
        if seq.request.max_tokens == 0:
            seq.status = SequenceStatus.FINISHED_LENGTH
        stats.num_generation_tokens += len(kept)
        if kept and seq.last_token_time is not None:
            stats.inter_token_latencies.append(((now - seq.last_token_time) / len(kept), len(kept)))
        seq.last_token_time = now
        if seq.status.is_finished:
            self.scheduler.finish(seq, seq.status)
            del self.detokenizers[seq.request_id]
            stats.finished.append(_finished_stats(seq, now))
        logprobs = out.logprobs[row]
        return make_output(
            seq, kept, detok,
            logprobs=None if logprobs is None else self._logprobs(logprobs[:len(kept)]),
            prompt_logprobs=None if out.prompt_logprobs is None
            else self._logprobs(out.prompt_logprobs))

    def _logprobs(self, entries) -> list[TokenLogprob]:
        text, raw = self._token_text, self._token_bytes
        return [TokenLogprob(t, text(t), lp, [(text(i), i, v, raw(i)) for i, v in top], raw(t))
                for t, lp, top in entries]

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every live request with ``error`` (after an unexpected exception in a step)."""
        live = list(self.scheduler.running) + list(self.scheduler.waiting)
        return [self.abort_request(seq.request_id, error=message) for seq in live]


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    """Such a sequence is prefilled whole and alone (never chunked), the first time (after a
    preemption its prompt logprobs have been sent: it recomputes like any other)."""
    return seq.request.sampling.prompt_logprobs is not None and not seq.num_output_tokens


def _finished_stats(seq: Sequence, now: float) -> FinishedStats:
    arrival = seq.request.arrival_time
    ttft = seq.first_token_time - arrival if seq.first_token_time else None
    n = seq.num_output_tokens
    tpot = (now - seq.first_token_time) / (n - 1) if n > 1 and seq.first_token_time else None
    queued = (seq.scheduled_time or now) - arrival
    return FinishedStats(now - arrival, ttft, tpot, seq.status.finish_reason or "", queued,
                         seq.num_prompt_tokens, n)


def _sampled(seqs: list[Sequence]) -> bool:
    """Whether a round over ``seqs`` samples or penalises (the controller prices those apart)."""
    return any(not s.request.sampling.greedy or s.request.sampling.has_penalties for s in seqs)


def _max_model_len(config: EngineConfig, max_position_embeddings: int) -> int:
    """The served ``max_model_len``: the configured one, else the model's context capped at
    :data:`DEFAULT_MAX_MODEL_LEN_CAP`.

    Raises:
        ValueError: a configured length above ``max_position_embeddings`` without
            ``allow_long_max_model_len`` (vLLM refuses the same unless
            ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``), or one below 1.
    """
    if config.max_model_len is None:
        return min(max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
    if config.max_model_len < 1:
        raise ValueError(f"max_model_len must be at least 1, got {config.max_model_len}")
    if config.max_model_len > max_position_embeddings and not config.allow_long_max_model_len:
        raise ValueError(
            f"max_model_len {config.max_model_len} is longer than the model's context "
            f"(max_position_embeddings = {max_position_embeddings}): positions past it give "
            "unreliable output and every KV cache slot grows with it. Pass "
            "--allow-long-max-model-len (LAYERSKIP_ALLOW_LONG_MAX_MODEL_LEN=1) to serve it anyway.")
    return config.max_model_len


def _pick(explicit, from_checkpoint, fallback):
    """An explicit setting, else the checkpoint's, else a fallback."""
    if explicit is not None:
        return explicit
    return from_checkpoint if from_checkpoint is not None else fallback


def _eos_ids(gen_cfg: dict, tokenizer) -> frozenset[int]:
    """EOS ids from the generation config (an int or a list) and the tokenizer."""
    ids = gen_cfg.get("eos_token_id")
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
