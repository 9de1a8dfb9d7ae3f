"""The paged KV cache: tensors in :class:`KVCache`, block bookkeeping in plain integers in
:class:`BlockManager` (docs/ARCHITECTURE.md §2.1; vLLM's PagedAttention, Kwon et al. 2023, §4).

Layout: one preallocated key and one value tensor per layer, ``(num_blocks, block_size,
num_kv_heads, head_dim)``. A sequence owns a ``block_table`` (vLLM's name): its position ``p``
lives in block ``block_table[p // block_size]`` at offset ``p % block_size``. Blocks are taken as
a sequence grows (a speculative round's lookahead included) and given back when a rollback
crosses a block boundary and when it finishes; the number of blocks comes from a memory budget,
not from ``max_num_seqs × max_model_len``. Self-speculative rollback is still assigning an
integer (``num_computed_tokens``): stale positions past it are masked by
``models.llama.AttentionBatch`` and overwritten by later writes. No KV is ever copied between
blocks.

Prefix caching (vLLM v1's automatic prefix caching, nano-vllm's ``BlockManager``): a block whose
``block_size`` positions all hold computed KV is registered under the hash of ``(its parent
block's hash, its tokens)``; a new sequence takes the cached blocks of its longest cached prefix
(all layers: the draft layers' KV too) and prefills only the rest. A block no sequence references
stays cached until it is needed: free blocks are handed out uncached ones first, then the least
recently freed cached ones (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from models.llama import AttentionBatch, BlockTables, cache_update, gather_index


class KVCache:
    """Per-layer key and value block pools.

    Args:
        num_layers: decoder layers ``L``.
        num_blocks: blocks in each pool.
        block_size: positions per block (tokens).
        num_kv_heads, head_dim: the model's KV geometry.
        dtype, device: where the tensors live.
        scratch_block: also allocate one block past the ``num_blocks`` the block manager hands
            out, :attr:`scratch_block`, which no sequence ever owns: the padding rows of a
            CUDA graph's static batch (:mod:`engine.cuda_graphs`) write their KV there, so they
            never touch another sequence's blocks.

    Memory: ``2 · L · (num_blocks [+ 1]) · block_size · num_kv_heads · head_dim · dtype size``
    bytes, reported by :attr:`nbytes` (:func:`bytes_per_block` gives one block's share).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device,
                 scratch_block: bool = False):
        shape = (num_blocks + scratch_block, block_size, num_kv_heads, head_dim)
        # Zeros, not empty: a padded block-table entry reads some block's keys under a mask, and
        # masked keys must be finite (0 · NaN is NaN in the attention product).
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block: int | None = num_blocks if scratch_block else None
        # Per layer, both pools as (positions, KV, hd) views (the scratch block's positions
        # included), made once (models.llama.cache_update).
        self.flat = [(k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim))
                     for k, v in zip(self.k, self.v)]

    @property
    def nbytes(self) -> int:
        """Bytes held by all key and value tensors."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a call's ``(B, T, KV, hd)`` keys/values of ``layer`` at ``batch``'s slots and
        return the ``(B, KV, S, hd)`` keys/values its queries attend over
        (:func:`models.llama.cache_update`)."""
        return cache_update(self.k[layer], self.v[layer], k, v, batch, self.flat[layer])


ROUND_KV_MAX_BYTES = 256 << 20
"""The most a round's gathered draft-layer KV copies may take (:class:`RoundKV`); a larger
batch gathers per call instead."""




class RoundKV:
    """A KV cache seen through one self-speculative round of a batch on the gather path: the
    layers in ``layers`` (the draft's ``[0, E)``) are gathered from the block pool once, at their
    first call in the round, into a ``(B, num_keys, KV, hd)`` copy per layer, and every later call
    writes its new keys and values into that copy as well as into the pool. The round's ``k + 1``
    draft calls then read the same prefix without gathering it ``k + 1`` times (at batch 8 and
    300 keys a layer's gather costs ~90 µs on the CPU, a quarter of the layer). Other layers, and
    the writes to the pool, are as with the cache itself.

    The copies live in ``scratch``, buffers kept from round to round (one per layer and K/V,
    grown by half again when a round needs more): allocating them afresh each round costs ~900
    page faults a round at batch 8, more than the gathers saved.

    Args:
        cache: the :class:`KVCache`.
        tables: the round's block tables (gather path: ``first_block`` None).
        num_keys: the most key positions any call of the round reads (tokens).
        layers: the layers to gather once.
        scratch: ``{(layer, 0 or 1): 1-D buffer}``, owned by the caller and reused.
    """

    def __init__(self, cache: KVCache, tables: BlockTables, num_keys: int, layers: range,
                 scratch: dict[tuple[int, int], torch.Tensor]):
        self.cache = cache
        self.k, self.v = cache.k, cache.v
        self.layers = layers
        self.num_keys = num_keys
        self.index = gather_index(tables, num_keys)  # (B · nb,)
        self.rows = tables.table.shape[0]
        self.scratch = scratch
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots: tuple[AttentionBatch, torch.Tensor] | None = None

    @staticmethod
    def nbytes(cache: KVCache, tables: BlockTables, num_keys: int, num_layers: int) -> int:
        """The copies' size for ``num_layers`` layers (bytes)."""
        pool = cache.k[0]
        nb = -(-num_keys // pool.shape[1])
        return 2 * num_layers * tables.table.shape[0] * nb * pool[0].numel() * pool.element_size()

    def _gather(self, i: int, half: int, pool: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s K (``half`` 0) or V (1) pool gathered into its scratch buffer:
        ``(B, nb · block_size, KV, hd)``."""
        shape = (self.index.numel(), *pool.shape[1:])
        numel = pool[0].numel() * shape[0]
        buf = self.scratch.get((i, half))
        if buf is None or buf.numel() < numel:  # grown with headroom: rows keep lengthening
            buf = self.scratch[(i, half)] = pool.new_empty(numel + numel // 2)
        out = buf[:numel].view(shape)
        torch.index_select(pool, 0, self.index, out=out)
        return out.view(self.rows, -1, *pool.shape[2:])

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`KVCache.update`; for a layer in :attr:`layers`, the keys/values are also
        written into its copy (gathered at the layer's first call, the new keys included), and
        the ``(B, KV, S, hd)`` returned are views of the copy's first ``S = batch.num_keys``."""
        if i not in self.layers:
            return self.cache.update(i, k, v, batch)
        flat = self.cache.flat[i]
        flat[0].index_put_((batch.slot_mapping,), k)
        flat[1].index_put_((batch.slot_mapping,), v)
        copy = self.copies.get(i)
        if copy is None:  # the first call: gather, the new keys included
            copy = self.copies[i] = (self._gather(i, 0, self.k[i]), self._gather(i, 1, self.v[i]))
        else:
            local = self._local_slots(batch, copy[0].shape[1])
            copy[0].flatten(0, 1).index_put_((local,), k)
            copy[1].flatten(0, 1).index_put_((local,), v)
        S = batch.num_keys
        return copy[0][:, :S].transpose(1, 2), copy[1][:, :S].transpose(1, 2)

    def _local_slots(self, batch: AttentionBatch, length: int) -> torch.Tensor:
        """``(B, T)`` where the batch's new tokens sit in the flattened copies (one per call)."""
        if self._slots is None or self._slots[0] is not batch:
            rows = torch.arange(self.rows, device=batch.positions.device)[:, None] * length
            self._slots = (batch, rows + batch.positions)
        return self._slots[1]


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Bytes one block takes in every layer's key and value pools."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` positions (the ceiling of the quotient)."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Hands out KV blocks, counts references, and keeps the prefix cache (host integers only).

    A block is *free* when no sequence references it; a free block may still be *cached* (it has
    a hash and a later sequence with the same prefix can take it back). The free blocks are two
    LRU queues: uncached ones, handed out first, then cached ones, whose hash is dropped when one
    is handed out (eviction).

    Args:
        num_blocks: blocks in the pool.
        block_size: positions per block (tokens).
        enable_prefix_caching: register full blocks and reuse them across sequences.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} "
                             f"blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[tuple[int | None, tuple[int, ...]], int] = {}  # key → block
        self._key_of: dict[int, tuple[int | None, tuple[int, ...]]] = {}  # block → its key
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache (a counter)
        self.num_hit_tokens = 0  # of which found (a counter)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (cached or not)."""
        return len(self._free) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """The fraction of blocks some sequence references (vLLM's ``kv_cache_usage_perc``, 0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _take(self, prefer: int | None) -> int:
        """One free block: ``prefer`` when it is free and uncached (so a sequence's blocks stay
        consecutive, which lets batch-1 attention read them as a view; a cached block is never
        evicted for that), else the oldest uncached one, else the least recently freed cached
        one (eviction: its hash is dropped)."""
        if prefer is not None and prefer in self._free:
            del self._free[prefer]
            block = prefer
        elif self._free:
            block, _ = self._free.popitem(last=False)
        else:
            block = self._evict(self._free_cached.popitem(last=False)[0])
        self.ref_count[block] = 1
        return block

    def _evict(self, block: int) -> int:
        """Drop a free cached block's hash (it is about to be reused); return it."""
        key = self._key_of.pop(block)
        if self._cached.get(key) == block:
            del self._cached[key]
        self.block_hash[block] = None
        return block

    def grow(self, block_table: list[int], num_tokens: int, expected_tokens: int = 0) -> bool:
        """Extend ``block_table`` in place to hold ``num_tokens`` positions.

        An empty table starts where :meth:`_run_start` finds room for ``expected_tokens``
        positions (the sequence's likely final length), so that it can grow in consecutive
        blocks; every later block is the one after the table's last when that is free.

        Returns: False, with ``block_table`` unchanged, when too few blocks are free.
        """
        need = blocks_for(num_tokens, self.block_size) - len(block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            prefer = block_table[-1] + 1 if block_table else self._run_start(
                blocks_for(max(num_tokens, expected_tokens), self.block_size))
            block_table.append(self._take(prefer))
        return True

    RUN_SEARCH_MAX_BLOCKS = 1 << 14
    """Pools larger than this skip :meth:`_run_start`'s linear scan (blocks)."""

    def _run_start(self, length: int) -> int | None:
        """The first block of the first run of ``length`` consecutive free uncached blocks, else
        of the longest such run (None on pools past :data:`RUN_SEARCH_MAX_BLOCKS`). Cached
        blocks are never evicted for it: the prefix cache is worth more than a view. One
        sequence's consecutive blocks are read as a view of the pool instead of gathered
        (``models.llama.BlockTables.first_block``)."""
        if self.num_blocks > self.RUN_SEARCH_MAX_BLOCKS:
            return None
        best, best_len, start, run = None, 0, None, 0
        for block in range(self.num_blocks):
            if block in self._free:
                start, run = (block if run == 0 else start), run + 1
                if run >= length:
                    return start
                if run > best_len:
                    best, best_len = start, run
            else:
                run = 0
        return best

    def shrink(self, block_table: list[int], num_tokens: int) -> None:
        """Give back the blocks of ``block_table`` past the first ``num_tokens`` positions (a
        rollback that crossed a block boundary)."""
        keep = blocks_for(num_tokens, self.block_size)
        while len(block_table) > keep:
            self._release(block_table.pop())

    def free(self, block_table: list[int]) -> None:
        """Give back all of a sequence's blocks (last first, so that its tail is evicted before
        the prefix other sequences are likelier to share) and empty the table."""
        while block_table:
            self._release(block_table.pop())

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if self.block_hash[block] is None:
                self._free[block] = None
            else:
                self._free_cached[block] = None

    def lookup(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Take the cached blocks of the longest cached prefix of ``token_ids[:num_tokens]``
        (full blocks only; the caller leaves at least one token to compute). Their references
        are counted; the hits are counted in :attr:`num_hit_tokens`.

        Returns: the blocks, in order (empty without prefix caching).
        """
        if not self.enable_prefix_caching:
            return []
        self.num_queried_tokens += len(token_ids)
        blocks, parent, bs = [], None, self.block_size
        for start in range(0, num_tokens - bs + 1, bs):
            key = (parent, tuple(token_ids[start:start + bs]))
            block = self._cached.get(key)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self._free_cached[block]
            self.ref_count[block] += 1
            blocks.append(block)
            parent = self.block_hash[block]
        self.num_hit_tokens += len(blocks) * bs
        return blocks

    def cache_full_blocks(self, block_table: list[int], token_ids: list[int],
                          num_computed_tokens: int, num_hashed: int) -> int:
        """Register the blocks of ``block_table`` that became full of computed KV since
        ``num_hashed`` of them were; return the new count. A block whose key another block
        already holds stays unregistered (the first one keeps serving hits)."""
        if not self.enable_prefix_caching:
            return num_hashed
        bs = self.block_size
        full = min(num_computed_tokens // bs, len(block_table))
        parent = self.block_hash[block_table[num_hashed - 1]] if num_hashed else None
        for i in range(num_hashed, full):
            block = block_table[i]
            if self.block_hash[block] is None:
                key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
                self.block_hash[block] = hash(key)
                self._key_of[block] = key
                self._cached.setdefault(key, block)
            parent = self.block_hash[block]
        return max(full, num_hashed)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence references."""
        for block in list(self._free_cached):
            del self._free_cached[block]
            key = self._key_of.pop(block)
            if self._cached.get(key) == block:
                del self._cached[key]
            self.block_hash[block] = None
            self._free[block] = None
