"""The self-speculative round for a batch (ARCHITECTURE.md §2; LayerSkip, Elhoushi et al. 2024, §5).

With exit layer ``E`` of ``L`` and ``k`` speculations, each running sequence, whose last token
sits at position ``c = num_computed_tokens``:

1. **Draft** ``k`` tokens: the input token at position ``c + i`` runs layers ``[0, E)`` (writing
   their KV); its layer-``E`` hidden state is kept; final norm + LM head pick ``d_{i+1}``.
2. **Verify**: ``d_k`` runs layers ``[0, E)`` at ``c + k``; layers ``[E, L)`` then run once over the
   ``k + 1`` cached exit states (positions ``c..c+k``), writing their KV; the head gives
   ``p_0..p_k``. Drafting's KV and exit states are reused, never recomputed.
3. **Accept** with :func:`engine.sampler.accept_drafts`: ``j`` drafts plus one token.
4. **Roll back**: the caller sets ``num_computed_tokens = c + j + 1``; stale KV past it is masked.

Every sequence of the batch drafts in the same forward calls and keeps its own positions, mask
and ``j``. ``k = 0`` is plain autoregressive decoding through the same code, the baseline.
Cost per round in layer calls: ``k·E + E + (L − E)``; per round one host transfer.
"""

from __future__ import annotations

import torch

from engine.sampler import accept_drafts, draft_token


class SpecDecodeRunner:
    """Runs prefills and self-speculative rounds of a :class:`models.llama.LlamaModel` over a KV cache."""

    def __init__(self, model, cache):
        self.model = model
        self.cache = cache
        self.device = model.device

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], slot: int) -> int:
        """Run all layers on a prompt of ``n`` tokens in ``slot``; return the next token (greedy).

        Afterwards the slot's positions ``0..n−1`` hold valid KV in every layer.
        """
        m, n = self.model, len(token_ids)
        ids = torch.tensor([token_ids], device=self.device)  # (1, n)
        positions = torch.arange(n, device=self.device)[None]  # (1, n)
        batch = m.attention_batch(torch.tensor([slot], device=self.device), positions, n,
                                  (slot, slot + 1))
        hidden = m.forward_layers(m.embed(ids), 0, m.num_layers, self.cache, batch)
        tokens, _ = accept_drafts(ids[:, :0], m.logits(hidden[:, -1:]))
        return int(tokens[0, 0])

    @torch.inference_mode()
    def decode_round(self, slots: list[int], last_tokens: list[int], num_computed: list[int],
                     exit_layer: int, k: int) -> tuple[list[list[int]], list[int]]:
        """One round for a batch of ``B`` sequences.

        Args:
            slots: each sequence's cache slot.
            last_tokens: each sequence's last token (sampled, not yet run through the model).
            num_computed: each sequence's ``num_computed_tokens`` (the last token's position).
            exit_layer: ``E`` in ``1..L``.
            k: speculations (0: plain decoding).

        Returns:
            ``(tokens, num_accepted)``: per sequence the ``j + 1`` tokens it emits, and ``j``.
        """
        m, dev, B = self.model, self.device, len(slots)
        slot_t = torch.tensor(slots, device=dev)  # (B,)
        base = torch.tensor(num_computed, device=dev)[:, None]  # (B, 1)
        contiguous = slots == list(range(slots[0], slots[0] + B))
        slot_range = (slots[0], slots[0] + B) if contiguous else None
        top = max(num_computed)
        tok = torch.tensor(last_tokens, device=dev)[:, None]  # (B, 1)
        if k == 0:
            batch = m.attention_batch(slot_t, base, top + 1, slot_range)
            hidden = m.forward_layers(m.embed(tok), 0, m.num_layers, self.cache, batch)
            tokens, accepted = accept_drafts(tok[:, :0], m.logits(hidden))
        else:
            exit_states, drafts = [], []
            for i in range(k + 1):
                batch = m.attention_batch(slot_t, base + i, top + i + 1, slot_range)
                hidden = m.forward_layers(m.embed(tok), 0, exit_layer, self.cache, batch)
                exit_states.append(hidden)  # (B, 1, D)
                if i < k:
                    tok = draft_token(m.logits(hidden))  # (B, 1)
                    drafts.append(tok)
            positions = base + torch.arange(k + 1, device=dev)  # (B, k+1)
            batch = m.attention_batch(slot_t, positions, top + k + 1, slot_range)
            hidden = m.forward_layers(torch.cat(exit_states, 1), exit_layer, m.num_layers,
                                      self.cache, batch)  # (B, k+1, D)
            tokens, accepted = accept_drafts(torch.cat(drafts, 1), m.logits(hidden))
        rows = torch.cat([tokens, accepted[:, None]], 1).tolist()  # the round's one transfer
        return [r[:r[-1] + 1] for r in rows], [r[-1] for r in rows]
