"""The paged KV cache: layout, size, writes through block tables, rollback by position alone, and
the block manager's references, prefix cache and LRU eviction."""

import pytest
import torch

from engine.kv_cache import BlockManager, KVCache, blocks_for, bytes_per_block
from models.llama import AttentionBatch, BlockTables, cache_update, gather_index


def _batch(tables: list[list[int]], positions, num_keys: int, block_size: int) -> AttentionBatch:
    bt = BlockTables.build(tables, block_size, "cpu")
    pos = torch.tensor(positions)
    return AttentionBatch(slot_mapping=bt.table.gather(1, pos // block_size) * block_size
                          + pos % block_size, positions=pos, cos=None, sin=None, mask=None,
                          num_keys=num_keys, gather_index=gather_index(bt, num_keys),
                          first_block=bt.first_block, block_size=block_size)


def test_layout_and_size():
    cache = KVCache(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8,
                    dtype=torch.float32, device="cpu")
    assert len(cache.k) == len(cache.v) == 3
    assert cache.k[0].shape == (5, 4, 2, 8)
    assert cache.nbytes == 2 * 3 * 5 * 4 * 2 * 8 * 4 == 5 * bytes_per_block(3, 4, 2, 8, torch.float32)
    assert blocks_for(8, 4) == 2 and blocks_for(9, 4) == 3 and blocks_for(0, 4) == 0


def test_writes_follow_the_block_table_and_rollback_overwrites_stale_entries():
    cache = KVCache(1, 6, 2, 1, 2, torch.float32, "cpu")
    k, v = cache.k[0], cache.v[0]
    new = torch.arange(6, dtype=torch.float32).view(1, 3, 1, 2)  # (B, T, KV, hd)
    # Positions 0, 1 in block 4, position 2 in block 1: not consecutive, so gathered.
    k_all, _ = cache_update(k, v, new, new, _batch([[4, 1]], [[0, 1, 2]], 3, 2))
    assert torch.equal(k[4, :, 0], new[0, :2, 0]) and torch.equal(k[1, 0, 0], new[0, 2, 0])
    assert k[0].abs().sum() == 0 and k_all.shape == (1, 1, 3, 2)
    assert torch.equal(k_all[0, 0], new[0, :, 0])
    # Roll back to length 1 and write a different token at position 1: no copy, just overwrite.
    replacement = torch.full((1, 1, 1, 2), -1.0)
    k_all, _ = cache_update(k, v, replacement, replacement, _batch([[4, 1]], [[1]], 2, 2))
    assert torch.equal(k_all[0, 0], torch.tensor([[0.0, 1.0], [-1.0, -1.0]]))
    # Consecutive blocks of one sequence are read as a view of the pool (no gather).
    batch = _batch([[2, 3]], [[3]], 4, 2)
    assert batch.first_block == 2 and batch.gather_index is None
    k_all, _ = cache_update(k, v, replacement, replacement, batch)
    assert k_all.data_ptr() == k[2].data_ptr() and k[3, 1, 0].tolist() == [-1.0, -1.0]
    # Two rows with tables of different lengths: the short one is padded, each row its own keys.
    both = torch.ones(2, 1, 1, 2)
    k_all, _ = cache_update(k, v, both, both, _batch([[5], [4, 1]], [[0], [3]], 4, 2))
    assert k_all.shape == (2, 1, 4, 2) and k[5, 0, 0].tolist() == [1.0, 1.0]
    assert k[1, 1, 0].tolist() == [1.0, 1.0] and k_all[1, 0, 2].tolist() == [4.0, 5.0]


def test_blocks_are_taken_consecutively_and_given_back():
    blocks = BlockManager(num_blocks=6, block_size=4)
    a, b = [], []
    assert blocks.grow(a, 5) and a == [0, 1]  # 5 positions → 2 blocks
    assert blocks.grow(b, 4) and b == [2]
    assert blocks.grow(a, 12) and a == [0, 1, 3]  # 2 is b's: the next free one
    assert blocks.num_free_blocks == 2 and blocks.usage == pytest.approx(4 / 6)
    assert not blocks.grow(b, 16) and b == [2]  # 3 more needed, 2 free: nothing taken
    blocks.shrink(a, 5)  # a rollback back across a block boundary
    assert a == [0, 1] and blocks.num_free_blocks == 3
    blocks.free(a)
    blocks.free(b)
    assert a == b == [] and blocks.num_free_blocks == 6 and blocks.usage == 0


def test_prefix_cache_shares_full_blocks_and_evicts_the_least_recently_freed():
    blocks = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    a = []
    assert blocks.lookup(tokens, 4) == []  # nothing cached yet
    blocks.grow(a, 5)
    # Only the full blocks of computed positions are registered: [1, 2] and [3, 4].
    assert blocks.cache_full_blocks(a, tokens, 5, 0) == 2
    b = blocks.lookup(tokens, 4)
    assert b == a[:2] and blocks.ref_count[a[0]] == 2
    assert blocks.lookup([1, 2, 9, 9, 9], 4) == a[:1]  # a different second block: one hit
    assert blocks.lookup([9, 2, 3, 4], 3) == []  # the chain starts at the first block
    assert (blocks.num_queried_tokens, blocks.num_hit_tokens) == (5 + 5 + 5 + 4, 4 + 2)
    blocks.free(b)
    blocks.free([a[0]])  # the extra reference the one-hit lookup took
    blocks.free(a)
    assert blocks.num_free_blocks == 4
    # Free but cached: a new lookup still finds them.
    c = blocks.lookup(tokens, 4)
    assert c == [0, 1]
    blocks.free(c)
    # Taking every block hands out the uncached ones first, then evicts the cached ones.
    d = []
    assert blocks.grow(d, 4) and d == [2, 3]  # a run of two uncached blocks
    assert blocks.grow(d, 8) and sorted(d) == [0, 1, 2, 3]  # then the cached ones go
    assert blocks.lookup(tokens, 4) == []  # evicted
    blocks.free(d)
    blocks.reset_prefix_cache()


def test_a_duplicate_block_stays_unregistered_and_never_evicts_the_first():
    blocks = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a, b = [], []
    blocks.grow(a, 2)
    blocks.grow(b, 2)
    blocks.cache_full_blocks(a, [7, 8], 2, 0)
    blocks.cache_full_blocks(b, [7, 8], 2, 0)  # computed at the same time: same key
    blocks.free(b)
    blocks.grow([], 6)  # evicts b's block (free, cached) but not a's mapping
    assert blocks.lookup([7, 8, 1], 2) == a


def test_contiguity_never_evicts_a_cached_block():
    """The same prompt again: its hit blocks, then not the first run's cached tail after them
    (a view is not worth a cached block) but an uncached one."""
    blocks = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5, 6]
    first = []
    blocks.grow(first, 6)
    blocks.cache_full_blocks(first, tokens, 6, 0)
    blocks.free(first)
    again = blocks.lookup(tokens, 5)  # positions 0..3 cached; 4..5 to compute
    assert again == [0, 1]
    blocks.grow(again, 6)
    assert again[:2] == [0, 1] and again[2] != 2
    assert blocks.lookup(tokens + [7, 8], 7) == [0, 1, 2]  # block 2 still cached


def test_a_new_table_starts_where_its_expected_length_fits_in_consecutive_blocks():
    blocks = BlockManager(num_blocks=10, block_size=2)
    a, b, c = [], [], []
    blocks.grow(a, 6)  # 0, 1, 2
    blocks.grow(b, 2)  # 3
    blocks.free(a)  # free: 4..9, then 2, 1, 0
    # Expected to reach 10 positions (5 blocks): the run 4..8, not block 0 (3 long).
    assert blocks.grow(c, 2, expected_tokens=10) and c == [4]
    assert blocks.grow(c, 10) and c == [4, 5, 6, 7, 8]
