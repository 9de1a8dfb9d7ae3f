"""The KV cache: tensors in :class:`KVCache`, slot bookkeeping in plain integers in :class:`SlotAllocator`.

Layout (docs/ARCHITECTURE.md §2.1, as in gpt-fast's static cache): one preallocated key and one value
tensor per layer, ``(num_slots, num_kv_heads, max_len, head_dim)``. A sequence owns one slot (a
row) for its life; its length is an integer on the host. Self-speculative rollback is assigning
that integer: stale positions past it are masked by ``models.llama.AttentionBatch`` and
overwritten by later writes. No KV is ever copied.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key and value tensors.

    Args:
        num_layers: decoder layers ``L``.
        num_slots: concurrent sequences (``max_num_seqs``).
        num_kv_heads, head_dim: the model's KV geometry.
        max_len: positions per slot (tokens): ``max_model_len`` plus room for one round's drafts.
        dtype, device: where the tensors live.

    Memory: ``2 · L · num_slots · num_kv_heads · max_len · head_dim · dtype size`` bytes, reported
    by :attr:`nbytes`.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        """Bytes held by all key and value tensors."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class SlotAllocator:
    """Hands out cache slots ``0..num_slots−1``; the lowest free slot first, so batches stay contiguous."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots))

    @property
    def num_free(self) -> int:
        """Slots not owned by any sequence."""
        return len(self._free)

    def can_allocate(self) -> bool:
        """Whether :meth:`allocate` would succeed."""
        return bool(self._free)

    def allocate(self) -> int:
        """Take the lowest free slot.

        Raises:
            RuntimeError: no slot is free (check :meth:`can_allocate` first).
        """
        if not self._free:
            raise RuntimeError("no free KV cache slot")
        self._free.sort()
        return self._free.pop(0)

    def free(self, slot: int) -> None:
        """Give a slot back.

        Raises:
            ValueError: the slot is out of range or already free.
        """
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
