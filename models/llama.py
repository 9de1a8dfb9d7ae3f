"""Our Llama forward: embed, ``forward_layers(h, start, end, cache, batch)``, final norm + LM head.

Self-speculative decoding (LayerSkip, Elhoushi et al. 2024, §5) needs to run a *range* of layers:
the draft runs layers ``[0, E)`` and reads the result out through the model's own final norm and
LM head; the verifier runs ``[E, L)`` on the cached exit hidden states. transformers' modules
always run every layer, so the forward is ours, written for small per-call overhead: fused q/k/v
and gate/up projections, RoPE tables computed once, one fused RMSNorm kernel, and attention with
``scaled_dot_product_attention`` over a static per-slot KV cache (as in gpt-fast). It matches
``transformers.LlamaForCausalLM`` within 1e-4 in fp32 (``tests/model/test_llama_reference.py``).

The cache is anything with ``k`` and ``v``: lists (one per layer) of tensors of shape
``(num_slots, num_kv_heads, max_len, head_dim)`` (see ``engine.kv_cache.KVCache``). A batch row
``b`` writes its new keys at ``[slots[b], :, positions[b]]`` and attends to keys ``0..position``
of its slot; rolling a sequence back is only a matter of the positions the next call uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions the forward needs, read from a Hugging Face ``LlamaConfig``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float


@dataclass
class AttentionBatch:
    """Where one forward call's tokens sit: built once per call and shared by all its layers.

    Attributes:
        slots: ``(B,)`` cache slot of each batch row.
        positions: ``(B, T)`` position of each new token.
        cos, sin: ``(B, T, 1, head_dim)`` RoPE factors of those positions.
        mask: ``(B, 1, T, S)`` bool, True where a query may attend to a key, or None when every
            key is visible (one sequence, one token).
        num_keys: ``S``, the key positions read from the cache (the largest position, plus one).
        slot_range: ``(first, last + 1)`` when the slots are consecutive, so the cache can be read
            as a view instead of gathered.
        pad_index: packed calls only (:meth:`LlamaModel.packed_attention_batch`): ``(T,)``, where
            each of the ``T`` packed tokens sits in the padded ``(B · T_max)`` query layout; its
            slot is ``slots[pad_index // T_max]``. None for an ordinary ``(B, T)`` batch.
        max_chunk: packed calls only: ``T_max``, the longest row's token count.
        token_slots: packed calls only: ``(1, T)`` the cache slot of each packed token.
    """

    slots: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    num_keys: int
    slot_range: tuple[int, int] | None
    pad_index: torch.Tensor | None = None
    max_chunk: int = 0
    token_slots: torch.Tensor | None = None


class LlamaModel:
    """Llama-family decoder weights and math, with layer-range forwards (no request logic).

    Args:
        shape: the model dimensions.
        weights: tensors named as in a Hugging Face Llama checkpoint (``model.layers.0...``).
        rope_cos, rope_sin: ``(max_len, head_dim)`` RoPE tables for positions ``0..max_len−1``.
    """

    def __init__(self, shape: LlamaShape, weights: dict[str, torch.Tensor],
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        self.shape = shape
        self.num_layers = shape.num_layers
        self.embed_tokens = weights["model.embed_tokens.weight"]  # (V, D)
        self.lm_head = weights.get("lm_head.weight", self.embed_tokens)  # (V, D)
        self.norm = weights["model.norm.weight"]  # (D,)
        self.rope_cos, self.rope_sin = rope_cos, rope_sin  # (max_len, hd)
        self.draft_ids: torch.Tensor | None = None  # (N,) the draft head's tokens, or all
        self.draft_head: torch.Tensor | None = None  # (N, D) their rows of lm_head
        self.layers = [self._fuse(weights, f"model.layers.{i}.") for i in range(shape.num_layers)]

    @staticmethod
    def _fuse(w: dict[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
        """One layer's weights, projections fused and stored transposed as ``(in, out)``.

        ``x @ W`` on a contiguous ``(in, out)`` matrix skips ``F.linear``'s per-call overhead,
        which dominates at decode sizes on the CPU (about 3× on a 1×128 by 128×384 product).
        """
        attn, mlp = p + "self_attn.", p + "mlp."

        def t(x: torch.Tensor) -> torch.Tensor:
            return x.t().contiguous()

        return {
            "ln1": w[p + "input_layernorm.weight"],
            "qkv": t(torch.cat([w[attn + "q_proj.weight"], w[attn + "k_proj.weight"],
                                w[attn + "v_proj.weight"]])),  # (D, (H + 2·KV)·hd)
            "o": t(w[attn + "o_proj.weight"]),  # (H·hd, D)
            "ln2": w[p + "post_attention_layernorm.weight"],
            "gate_up": t(torch.cat([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]])),
            "down": t(w[mlp + "down_proj.weight"]),  # (I, D)
        }

    @property
    def device(self) -> torch.device:
        """The device the weights live on."""
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (also the hidden states' and the KV cache's)."""
        return self.embed_tokens.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids → ``(B, T, D)`` hidden states."""
        return F.embedding(token_ids, self.embed_tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: ``(B, T, D)`` hidden states → ``(B, T, V)`` float32 logits.

        Applied to any layer's output this is LayerSkip's early-exit read-out (§4.2).
        """
        s = self.shape
        return F.linear(F.rms_norm(hidden, (s.hidden_size,), self.norm, s.rms_norm_eps),
                        self.lm_head).float()

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        """Restrict the draft's LM head to ``token_ids`` ``(N,)`` (FR-Spec, Zhao et al. 2025,
        arXiv 2502.14856: the most frequent tokens); None restores the full head. The verifier's
        head (:meth:`logits`) is never restricted."""
        if token_ids is None or len(token_ids) >= self.shape.vocab_size:
            self.draft_ids = self.draft_head = None
            return
        self.draft_ids = token_ids.to(self.device)
        self.draft_head = self.lm_head[self.draft_ids].contiguous()  # (N, D)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's read-out: ``(B, T, D)`` exit states → ``(B, T, N)`` float32 logits over
        :attr:`draft_ids` (all ``V`` tokens, in id order, when unrestricted)."""
        if self.draft_head is None:
            return self.logits(hidden)
        s = self.shape
        return F.linear(F.rms_norm(hidden, (s.hidden_size,), self.norm, s.rms_norm_eps),
                        self.draft_head).float()

    def draft_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy draft tokens: ``(B, T, D)`` exit states → ``(B, T)`` token ids (head + argmax)."""
        best = self.draft_logits(hidden).argmax(-1)  # (B, T) indices into draft_ids
        return best if self.draft_ids is None else self.draft_ids[best]

    def draft_full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`draft_logits` scattered to ``(B, T, V)``, ``-inf`` outside :attr:`draft_ids`,
        so a distribution built from them is the draft's, renormalised over its tokens (and 0
        elsewhere)."""
        logits = self.draft_logits(hidden)
        if self.draft_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.shape.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_ids, logits)  # (B, T, V)

    def attention_batch(self, slots: torch.Tensor, positions: torch.Tensor, num_keys: int,
                        slot_range: tuple[int, int] | None = None) -> AttentionBatch:
        """Build the per-call geometry for tokens at ``positions`` ``(B, T)`` of cache ``slots`` ``(B,)``.

        ``num_keys`` is ``max(positions) + 1``, passed in by the caller, who knows it on the host,
        so that building the batch never waits for the device. Keys at positions up to each
        query's own position are visible (causal within the new tokens, everything before them);
        stale keys past a rolled-back length are masked.
        """
        B, T = positions.shape
        mask = None  # one token of one sequence sees all num_keys keys: no mask, a faster kernel
        if B > 1 or T > 1:
            key_pos = torch.arange(num_keys, device=positions.device)  # (S,)
            mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        return AttentionBatch(
            slots=slots, positions=positions,
            cos=self.rope_cos[positions][:, :, None], sin=self.rope_sin[positions][:, :, None],
            mask=mask, num_keys=num_keys, slot_range=slot_range,
        )

    def packed_attention_batch(self, slots: torch.Tensor, lengths: list[int], starts: list[int],
                               slot_range: tuple[int, int] | None = None) -> AttentionBatch:
        """The geometry of ``B`` chunks of different lengths packed into one ``(1, T)`` call
        (chunked prefill: every prefill chunk of a step in one forward, whatever its length).

        Row ``b`` brings ``lengths[b]`` tokens at positions ``starts[b]..starts[b]+lengths[b]−1``
        of cache slot ``slots[b]``. The projections and MLPs run on the ``T = Σ lengths`` packed
        tokens (no padding); only attention scatters the queries into a padded ``(B, T_max)``
        layout, so each row attends over its own slot's keys (FlashAttention's "varlen" idea
        with a plain gather). Padding never writes KV. Host lists in, so no device sync.
        """
        dev, B, t_max = slots.device, len(lengths), max(lengths)
        pad_index = torch.tensor([b * t_max + i for b, n in enumerate(lengths) for i in range(n)],
                                 device=dev)  # (T,)
        positions = torch.tensor([s + i for s, n in zip(starts, lengths) for i in range(n)],
                                 device=dev)[None]  # (1, T)
        num_keys = max(s + n for s, n in zip(starts, lengths))
        pad_pos = torch.zeros(B * t_max, dtype=torch.long, device=dev)  # a pad query sees key 0
        pad_pos[pad_index] = positions[0]
        key_pos = torch.arange(num_keys, device=dev)  # (S,)
        mask = (key_pos[None, None, :] <= pad_pos.view(B, t_max, 1))[:, None]  # (B, 1, T_max, S)
        return AttentionBatch(slots=slots, positions=positions,
                              cos=self.rope_cos[positions][:, :, None],
                              sin=self.rope_sin[positions][:, :, None], mask=mask,
                              num_keys=num_keys, slot_range=slot_range, pad_index=pad_index,
                              max_chunk=t_max, token_slots=slots[pad_index // t_max][None])

    def forward_layers(self, hidden: torch.Tensor, start: int, end: int, cache,
                       batch: AttentionBatch) -> torch.Tensor:
        """Run decoder layers ``[start, end)`` on ``(B, T, D)`` hidden states; return ``(B, T, D)``.

        Each layer writes the new tokens' keys and values into ``cache`` at ``batch``'s slots and
        positions before attending, so a later call can continue from them.
        """
        for i in range(start, end):
            hidden = self._layer(i, hidden, cache, batch)
        return hidden

    def _layer(self, i: int, h: torch.Tensor, cache, batch: AttentionBatch) -> torch.Tensor:
        s, w = self.shape, self.layers[i]
        B, T, _ = h.shape
        H, KV, hd = s.num_heads, s.num_kv_heads, s.head_dim
        x = F.rms_norm(h, (s.hidden_size,), w["ln1"], s.rms_norm_eps)
        qkv = (x @ w["qkv"]).view(B, T, H + 2 * KV, hd)  # (B, T, H+2KV, hd)
        qk = _rope(qkv[:, :, :H + KV], batch.cos, batch.sin)  # (B, T, H+KV, hd)
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        k_all, v_all = _cache_update(cache.k[i], cache.v[i], qk[:, :, H:], qkv[:, :, H + KV:],
                                     batch)  # (B, KV, S, hd) each
        if batch.pad_index is None:
            attn = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=batch.mask,
                                                  enable_gqa=H != KV)  # (B, H, T, hd)
            attn = attn.transpose(1, 2).reshape(B, T, H * hd)
        else:
            attn = _packed_attention(q, k_all, v_all, batch, H != KV)  # (1, T, H·hd)
        h = h + attn @ w["o"]
        x = F.rms_norm(h, (s.hidden_size,), w["ln2"], s.rms_norm_eps)
        gate, up = (x @ w["gate_up"]).chunk(2, dim=-1)  # (B, T, I) each
        return h + (F.silu(gate) * up) @ w["down"]


def _packed_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                      batch: AttentionBatch, gqa: bool) -> torch.Tensor:
    """Attention of ``(1, H, T, hd)`` packed queries over their rows' ``(B, KV, S, hd)`` keys:
    queries scattered into ``(B, H, T_max, hd)``, attended, gathered back; ``(1, T, H·hd)``."""
    _, H, T, hd = q.shape
    B, t_max = k_all.shape[0], batch.max_chunk
    padded = q.new_zeros(B * t_max, H, hd).index_copy_(0, batch.pad_index, q[0].transpose(0, 1))
    padded = padded.view(B, t_max, H, hd).transpose(1, 2)  # (B, H, T_max, hd)
    attn = F.scaled_dot_product_attention(padded, k_all, v_all, attn_mask=batch.mask,
                                          enable_gqa=gqa)  # (B, H, T_max, hd)
    return attn.transpose(1, 2).reshape(B * t_max, H * hd)[batch.pad_index][None]  # (1, T, H·hd)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Hugging Face (rotate-half) layout; ``x`` is ``(B, T, heads, hd)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _cache_update(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``(B, T, KV, hd)`` keys/values at the batch's slots and positions; read ``(B, KV, S, hd)``."""
    if batch.token_slots is not None:  # packed: (1, T) tokens, each with its own row's slot
        rows = batch.token_slots  # (1, T)
    else:
        rows = batch.slots[:, None]  # (B, 1), broadcast against positions (B, T)
    k_cache[rows, :, batch.positions] = k
    v_cache[rows, :, batch.positions] = v
    num_keys = batch.num_keys
    if batch.slot_range is not None:
        first, stop = batch.slot_range
        return k_cache[first:stop, :, :num_keys], v_cache[first:stop, :, :num_keys]
    return k_cache[batch.slots, :, :num_keys], v_cache[batch.slots, :, :num_keys]
