"""CUDA graphs of the decode-time forward calls: the plain decode step, the draft step and the
verify call (vLLM's ``CUDAGraphRunner``; ``--enforce-eager`` turns them off).

At decode sizes an eager step on a GPU is bound by kernel launches, not by HBM: a Llama-3.2-1B
layer reads ~120 MB of bf16 weights (~25 µs at 4.8 TB/s) against ~25 launches of a few µs each.
A graph replays a whole layer range as one launch. Graphs need static shapes and static
addresses, so each call runs on static input buffers:

- the batch is padded to its **batch bucket** (:func:`batch_buckets`: 1, 2, 4, 8, … up to
  ``max_num_seqs``); padding rows sit at position 0 of a block table made only of the cache's
  scratch block (:attr:`engine.kv_cache.KVCache.scratch_block`, owned by no sequence), so their
  KV writes land there and never in another sequence's blocks, and their outputs are dropped;
- the key length is padded to its **key bucket** (:func:`key_buckets`: powers of two from 256
  tokens up to the cache's longest sequence), and the block table to the blocks that hold it
  (the extra entries are the scratch block, masked like any stale key);
- token ids, hidden states, positions and the block table are the graph's inputs; the
  :class:`models.llama.AttentionBatch` (slot mapping, gather index, mask, RoPE factors) is built
  *inside* the graph from them.

One code path for the math: a captured graph replays :func:`forward_call`, the function the
eager path calls (with ``padded=True``, and the padded buffers); with ``capture=False`` (always on
the CPU, and in the CPU tests) :class:`GraphRunner` runs that same function eagerly on the same
padded buffers, so the padding and bucketing logic is tested without a GPU.

**What capture costs (estimated; not measured here, there was no GPU):** each graph is one
warm-up run plus one captured run, ~2× an eager call (a 16-layer 1B shape: ~400 launches,
~2-5 ms) plus instantiation (~1-10 ms for a few hundred nodes), so ~10-20 ms a graph. The
engine captures ``len(batch buckets) × len(key buckets) × (2 + len(ks))`` graphs: for
``max_num_seqs`` 32, ``max_model_len`` 8192 and ``k ≤ 4``, 6 × 7 × 6 = 252 graphs, ~3-5 s of
start-up. Memory: all graphs share one private pool, which holds the largest graph's
intermediates, dominated by one layer's gathered keys and values
``2 · B · S · num_kv_heads · head_dim`` elements (B 32, S 8192, 8 KV heads of 64, bf16:
~0.5 GB) and the verify logits ``B · (k + 1) · V`` float32 (~80 MB at V = 128 256); the static
inputs are small (``B · (k + 1) · hidden``). Measure with ``bench/gpu_check.py`` on a GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.kv_cache import ROUND_KV_MAX_BYTES, RoundKV
from models.llama import BlockTables

logger = logging.getLogger(__name__)

MIN_KEY_BUCKET = 256
"""The smallest key-length bucket (tokens): shorter contexts pay attention over 256 keys."""


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes graphs are captured for: 1, 2, 4, … and ``max_num_seqs`` itself
    (``max_num_seqs`` 12 → ``[1, 2, 4, 8, 12]``)."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return sizes + [max_num_seqs]


def key_buckets(max_keys: int, block_size: int, smallest: int = MIN_KEY_BUCKET) -> list[int]:
    """Key lengths (tokens) graphs are captured for: powers of two from ``smallest`` below
    ``max_keys``, then ``max_keys``; each rounded up to whole blocks of ``block_size``."""
    sizes, n = [], smallest
    while n < max_keys:
        sizes.append(n)
        n *= 2
    sizes.append(max_keys)
    return sorted({-(-s // block_size) * block_size for s in sizes})


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``n``; None when ``n`` exceeds them all."""
    return next((b for b in buckets if b >= n), None)


def forward_call(model, cache, tables: BlockTables, inputs: torch.Tensor,
                 positions: torch.Tensor, num_keys: int, start: int, end: int, head: bool,
                 padded: bool = False) -> torch.Tensor:
    """The math of every decode-time call, eager or captured: layers ``[start, end)``.

    Args:
        model: a :class:`models.llama.LlamaModel`; cache: its KV cache.
        tables: the rows' block tables.
        inputs: ``(B, T)`` token ids when ``start == 0`` (embedded here), else ``(B, T, D)``
            hidden states (the draft's cached exit states).
        positions: ``(B, T)`` each token's position; num_keys: keys to attend over (at least
            ``max(positions) + 1``; with ``padded``, its bucket).
        head: apply the final norm and LM head.

    Returns: ``(B, T, V)`` float32 logits with ``head``, else ``(B, T, D)`` hidden states.
    """
    batch = model.attention_batch(tables, positions, num_keys, padded=padded)
    hidden = model.embed(inputs) if start == 0 else inputs
    hidden = model.forward_layers(hidden, start, end, cache, batch)
    return model.logits(hidden) if head else hidden


@dataclass(frozen=True)
class GraphKey:
    """What a graph is specialised to: padded batch ``batch``, ``num_tokens`` per row, key
    bucket ``num_keys``, layers ``[start, end)``, and whether it applies the head."""

    batch: int
    num_tokens: int
    num_keys: int
    start: int
    end: int
    head: bool


class GraphRunner:
    """Static input buffers for every bucket, and the graphs captured over them.

    Args:
        model, cache: the model and its KV cache (which must have a ``scratch_block``).
        max_num_seqs: the largest batch; max_keys: the longest key length (tokens: the cache's
            ``max_model_len`` plus a round's lookahead); max_tokens: the most tokens a row
            brings to one call (``k_max + 1``).
        capture: capture CUDA graphs (:meth:`capture`); False runs :func:`forward_call` eagerly
            on the padded buffers (the CPU, and the padding tests).
        smallest_key_bucket: the first key bucket (tokens; see :func:`key_buckets`).

    Raises:
        ValueError: the cache has no scratch block.
    """

    def __init__(self, model, cache, max_num_seqs: int, max_keys: int, max_tokens: int,
                 capture: bool = False, smallest_key_bucket: int = MIN_KEY_BUCKET):
        if cache.scratch_block is None:
            raise ValueError("CUDA graphs need a KV cache with a scratch block for padding rows")
        self.model, self.cache, self.capture_enabled = model, cache, capture
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.key_sizes = key_buckets(max_keys, cache.block_size, smallest_key_bucket)
        B, dev, D = self.batch_sizes[-1], model.device, model.shape.hidden_size
        nb = self.key_sizes[-1] // cache.block_size
        self.table = torch.full((B, nb), cache.scratch_block, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)  # (B, 1)
        self.positions = {t: torch.zeros(B, t, dtype=torch.long, device=dev)
                          for t in range(1, max_tokens + 1)}  # T → (B, T)
        self.hidden = {t: torch.zeros(B, t, D, dtype=model.dtype, device=dev)
                       for t in range(1, max_tokens + 1)}  # T → (B, T, D)
        self.graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.exit_layer: int | None = None  # the draft graphs' exit layer, once captured
        self.capture_seconds = 0.0

    def fits(self, batch: int, num_keys: int, num_tokens: int) -> bool:
        """Whether a call of ``batch`` rows of ``num_tokens`` tokens over ``num_keys`` keys has
        a bucket."""
        return (batch <= self.batch_sizes[-1] and num_keys <= self.key_sizes[-1]
                and num_tokens in self.positions)

    def begin_round(self, block_tables: list[list[int]], num_keys: int) -> "PaddedForward":
        """Load a round's block tables into the static table (rows padded with the scratch
        block, padding rows all scratch) for the key bucket of ``num_keys``; return the callable
        that runs the round's calls. One host-to-device copy."""
        B = len(block_tables)
        padded_b, keys = bucket_for(B, self.batch_sizes), bucket_for(num_keys, self.key_sizes)
        nb, scratch = keys // self.cache.block_size, self.cache.scratch_block
        rows = [t[:nb] + [scratch] * (nb - len(t[:nb])) for t in block_tables]
        rows += [[scratch] * nb] * (padded_b - B)
        self.table[:padded_b, :nb].copy_(torch.tensor(rows), non_blocking=True)
        return PaddedForward(self, B, padded_b, keys)

    def tables(self, padded_b: int, keys: int) -> BlockTables:
        """The static block table of a bucket, as :class:`models.llama.BlockTables` (a view)."""
        return BlockTables(self.table[:padded_b, :keys // self.cache.block_size],
                           self.cache.block_size, None)

    def run(self, key: GraphKey) -> torch.Tensor:
        """Replay ``key``'s graph (its static output: valid until the next replay of it), or,
        without one, run :func:`forward_call` eagerly on the same static buffers."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph[0].replay()
            return graph[1]
        return self._call(key)

    def _call(self, key: GraphKey) -> torch.Tensor:
        B, T = key.batch, key.num_tokens
        inputs = self.tokens[:B] if key.start == 0 else self.hidden[T][:B]
        return forward_call(self.model, self.cache, self.tables(B, key.num_keys), inputs,
                            self.positions[T][:B], key.num_keys, key.start, key.end, key.head,
                            padded=True)

    def capture(self, exit_layer: int, ks: list[int]) -> None:
        """Capture the plain decode step, the draft step (layers ``[0, exit_layer)``; not when
        ``ks`` is empty) and the verify call for each ``k`` in ``ks``, for every batch and key
        bucket (largest first, so that the shared pool is sized by the largest). A no-op
        without ``capture``."""
        if not self.capture_enabled:
            return
        L, started = self.model.num_layers, time.perf_counter()
        self.exit_layer = exit_layer
        kinds = [(1, 0, L, True)] + ([(1, 0, exit_layer, False)] if ks else [])
        kinds += [(k + 1, exit_layer, L, True) for k in ks if k + 1 in self.positions]
        torch.cuda.synchronize()
        with torch.inference_mode():
            for B in reversed(self.batch_sizes):
                for S in reversed(self.key_sizes):
                    for T, start, end, head in kinds:
                        self._capture_one(GraphKey(B, T, S, start, end, head))
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        logger.info("captured %d CUDA graphs (batch sizes %s, key lengths %s, k %s) in %.2f s",
                    len(self.graphs), self.batch_sizes, self.key_sizes, ks, self.capture_seconds)

    def _capture_one(self, key: GraphKey) -> None:
        """Warm up on a side stream, then capture ``key``'s call (all rows scratch, position 0,
        so neither run writes outside the scratch block)."""
        self.table.fill_(self.cache.scratch_block)
        for t in self.positions.values():
            t.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._call(key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._call(key)
        self.pool = graph.pool()
        self.graphs[key] = (graph, out)


class PaddedForward:
    """One round's calls through a :class:`GraphRunner`: the same signature as
    :class:`EagerForward`, the batch padded to ``padded_b`` rows and the keys to ``num_keys``."""

    def __init__(self, runner: GraphRunner, batch: int, padded_b: int, num_keys: int):
        self.runner, self.batch, self.padded_b, self.num_keys = runner, batch, padded_b, num_keys

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor, num_keys: int, start: int,
                 end: int, head: bool) -> torch.Tensor:
        """Copy ``inputs`` and ``positions`` ``(B, T)`` into the static buffers (padding rows at
        position 0), replay; return the real rows' output, ``(B, T, V)`` or ``(B, T, D)``
        (a copy for hidden states, which the next draft step's replay would overwrite).
        ``num_keys`` is the call's own, covered by the round's bucket."""
        r, B, T = self.runner, self.batch, positions.shape[1]
        pos = r.positions[T]
        pos[:B].copy_(positions)
        if self.padded_b > B:
            pos[B:self.padded_b].zero_()
        (r.tokens if start == 0 else r.hidden[T])[:B].copy_(inputs)
        out = r.run(GraphKey(self.padded_b, T, self.num_keys, start, end, head))[:B]
        return out if head else out.clone()


class EagerForward:
    """One round's calls run directly (``--enforce-eager``, the CPU, and any call without a
    bucket): :func:`forward_call` on the round's unpadded block tables.

    ``exit_layer``, ``max_keys`` and ``scratch`` (a drafting round on the gather path): the
    draft's layers ``[0, exit_layer)`` read the KV through a :class:`engine.kv_cache.RoundKV`,
    gathered once for the round's ``k + 1`` draft calls (whose keys never exceed ``max_keys``)
    into ``scratch``'s buffers, unless those copies would exceed :data:`engine.kv_cache.ROUND_KV_MAX_BYTES`."""

    def __init__(self, model, cache, tables: BlockTables, exit_layer: int = 0, max_keys: int = 0,
                 scratch: dict | None = None):
        self.model, self.cache, self.tables = model, cache, tables
        self.draft_cache = cache
        if (exit_layer and scratch is not None and tables.first_block is None
                and RoundKV.nbytes(cache, tables, max_keys, exit_layer) <= ROUND_KV_MAX_BYTES):
            self.draft_cache = RoundKV(cache, tables, max_keys, range(exit_layer), scratch)

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor, num_keys: int, start: int,
                 end: int, head: bool) -> torch.Tensor:
        """See :func:`forward_call`."""
        cache = self.draft_cache if start == 0 and not head else self.cache
        return forward_call(self.model, cache, self.tables, inputs, positions, num_keys,
                            start, end, head)
