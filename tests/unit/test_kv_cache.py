"""The static per-slot KV cache: layout, size, and rollback by position alone."""

import torch

from engine.kv_cache import KVCache
from models.llama import AttentionBatch, _cache_update


def _batch(slots, positions, num_keys, slot_range=None) -> AttentionBatch:
    return AttentionBatch(slots=torch.tensor(slots), positions=torch.tensor(positions), cos=None,
                          sin=None,
                          mask=None, num_keys=num_keys, slot_range=slot_range)


def test_layout_and_size():
    cache = KVCache(num_layers=3, num_slots=4, num_kv_heads=2, max_len=16, head_dim=8,
                    dtype=torch.float32, device="cpu")
    assert len(cache.k) == len(cache.v) == 3
    assert cache.k[0].shape == (4, 2, 16, 8)
    assert cache.nbytes == 2 * 3 * 4 * 2 * 16 * 8 * 4


def test_writes_land_at_slot_and_position_and_rollback_overwrites_stale_entries():
    cache = KVCache(1, 3, 1, 8, 2, torch.float32, "cpu")
    k, v = cache.k[0], cache.v[0]
    new = torch.arange(6, dtype=torch.float32).view(1, 3, 1, 2)  # (B, T, KV, hd)
    k_all, _ = _cache_update(k, v, new, new, _batch([2], [[0, 1, 2]], 3, (2, 3)))
    assert torch.equal(k[2, 0, :3], new[0, :, 0]) and k[0].abs().sum() == 0
    assert k_all.shape == (1, 1, 3, 2)
    # Roll back to length 1 and write a different token at position 1: no copy, just overwrite.
    replacement = torch.full((1, 1, 1, 2), -1.0)
    k_all, _ = _cache_update(k, v, replacement, replacement, _batch([2], [[1]], 2, (2, 3)))
    assert torch.equal(k_all[0, 0], torch.tensor([[0.0, 1.0], [-1.0, -1.0]]))
    # Two slots that are not neighbours are gathered, each with its own position.
    both = torch.ones(2, 1, 1, 2)
    k_all, _ = _cache_update(k, v, both, both, _batch([0, 2], [[0], [3]], 4))
    assert k_all.shape == (2, 1, 4, 2) and k[0, 0, 0].tolist() == [1.0, 1.0]
    assert k[2, 0, 3].tolist() == [1.0, 1.0] and k[2, 0, 2].tolist() == [4.0, 5.0]
