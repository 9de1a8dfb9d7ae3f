"""Our Llama forward: embed, ``forward_layers(h, start, end, cache, batch)``, final norm + LM head.

Self-speculative decoding (LayerSkip, Elhoushi et al. 2024, §5) needs to run a *range* of layers:
the draft runs layers ``[0, E)`` and reads the result out through the model's own final norm and
LM head; the verifier runs ``[E, L)`` on the cached exit hidden states. transformers' modules
always run every layer, so the forward is ours, written for small per-call overhead: fused q/k/v
and gate/up projections, RoPE tables computed once, one fused RMSNorm kernel, and attention with
``scaled_dot_product_attention`` over a paged KV cache (vLLM's PagedAttention layout, read the
gpt-fast way). It matches ``transformers.LlamaForCausalLM`` within 1e-4 in fp32
(``tests/model/test_llama_reference.py``).

The cache is anything with ``update(layer, k, v, batch) -> (keys, values)``, which writes a
call's new keys and values and returns the keys and values its queries attend over
(``engine.kv_cache.KVCache``, whose pools are ``(num_blocks, block_size, num_kv_heads,
head_dim)`` per layer, does it with :func:`cache_update`; ``engine.kv_cache.RoundKV`` keeps a
round's draft-layer reads). A batch row ``b`` with block table ``t`` writes position ``p``'s
keys at ``[t[p // block_size], p % block_size]`` and attends to keys ``0..position`` of its own
blocks, gathered block by block (one ``index_select`` per layer and call) or, for one sequence
whose blocks are consecutive, read as a view; rolling a sequence back is only a matter of the
positions the next call uses.
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
class BlockTables:
    """A batch's block tables on the device, built once per round and shared by its calls.

    Attributes:
        table: ``(B, nb)`` block ids, row ``b``'s first ``len(tables[b])`` real and the rest
            padding (block 0, always masked).
        block_size: positions per block (tokens).
        first_block: when the batch is one sequence whose blocks are consecutive, its first
            block (attention then reads the pool as a view, no gather); else None.
    """

    table: torch.Tensor
    block_size: int
    first_block: int | None

    @classmethod
    def build(cls, tables: list[list[int]], block_size: int, device) -> "BlockTables":
        """From host lists of block ids (one per row; no device sync)."""
        nb = max(len(t) for t in tables)
        first = None
        if len(tables) == 1 and tables[0] == list(range(tables[0][0], tables[0][0] + nb)):
            first = tables[0][0]
        padded = [t + [0] * (nb - len(t)) for t in tables]
        return cls(torch.tensor(padded, device=device), block_size, first)


@dataclass
class AttentionBatch:
    """Where one forward call's tokens sit: built once per call and shared by all its layers.

    Attributes:
        slot_mapping: ``(B, T)`` (packed: ``(1, T)``) where each new token's keys go in the
            pool flattened to ``(num_blocks · block_size, KV, hd)`` (vLLM's ``slot_mapping``).
        positions: ``(B, T)`` position of each new token.
        cos, sin: ``(B, T, 1, head_dim)`` RoPE factors of those positions.
        mask: ``(B, 1, T, S)`` additive, in the model's dtype: 0 where a query may attend to a
            key, ``-inf`` where not (:func:`_additive_mask`); or None when every key is visible
            (one sequence, one token).
        num_keys: ``S``, the key positions read from the cache (the largest position, plus one).
        gather_index: ``(B · nb,)`` the blocks to read, row by row (``nb`` blocks hold ``S``
            positions); None when :attr:`first_block` reads a view.
        first_block: see :attr:`BlockTables.first_block`.
        block_size: positions per block (tokens).
        pad_index: packed calls only (:meth:`LlamaModel.packed_attention_batch`): ``(T,)``, where
            each of the ``T`` packed tokens sits in the padded ``(B · T_max)`` query layout; its
            row is ``pad_index // T_max``. None for an ordinary ``(B, T)`` batch.
        max_chunk: packed calls only: ``T_max``, the longest row's token count.
    """

    slot_mapping: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    num_keys: int
    gather_index: torch.Tensor | None
    first_block: int | None
    block_size: int
    pad_index: torch.Tensor | None = None
    max_chunk: int = 0


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
        self.draft_head: torch.Tensor | None = None  # (D, N) their rows of lm_head, transposed
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
        # Stored (D, N) for ``x @ W``, as the layers' weights are (see :meth:`_fuse`): on the
        # CPU that halves the head's cost at decode sizes (33 against 17 µs for N = 3072).
        self.draft_head = self.lm_head[self.draft_ids].t().contiguous()  # (D, N)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's read-out: ``(B, T, D)`` exit states → ``(B, T, N)`` float32 logits over
        :attr:`draft_ids` (all ``V`` tokens, in id order, when unrestricted)."""
        if self.draft_head is None:
            return self.logits(hidden)
        s = self.shape
        return (F.rms_norm(hidden, (s.hidden_size,), self.norm, s.rms_norm_eps)
                @ self.draft_head).float()

    def draft_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy draft tokens: ``(B, T, D)`` exit states → ``(B, T)`` token ids (head + argmax)."""
        # ``max`` gives argmax's index (the first of ties), 1.4-3× faster on the CPU.
        best = self.draft_logits(hidden).max(-1).indices  # (B, T) indices into draft_ids
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

    def attention_batch(self, tables: BlockTables, positions: torch.Tensor,
                        num_keys: int, padded: bool = False) -> AttentionBatch:
        """Build the per-call geometry for tokens at ``positions`` ``(B, T)`` of the rows of
        ``tables``.

        ``num_keys`` is ``max(positions) + 1``, passed in by the caller, who knows it on the host,
        so that building the batch never waits for the device. Keys at positions up to each
        query's own position are visible (causal within the new tokens, everything before them);
        stale keys past a rolled-back length, and padding blocks, are masked.

        ``padded``: ``num_keys`` is a bucket at least that large (a CUDA graph's static key
        length), so the mask is built even for one token of one sequence. Only device ops on
        ``tables.table`` and ``positions`` run here, so a CUDA graph can capture it.
        """
        B, T = positions.shape
        bs = tables.block_size
        mask = None  # one token of one sequence sees all num_keys keys: no mask, a faster kernel
        if B > 1 or T > 1 or padded:
            key_pos = torch.arange(num_keys, device=positions.device)  # (S,)
            mask = _additive_mask(key_pos[None, None, :] <= positions[:, :, None],
                                  self.dtype)  # (B, 1, T, S)
        if num_keys > tables.table.shape[1] * bs:  # host ints: the gather below would raise
            raise ValueError(f"{num_keys} key positions do not fit the batch's "
                             f"{tables.table.shape[1]} blocks of {bs}")
        if tables.first_block is not None:  # consecutive blocks: one op, not five
            slot_mapping = positions + tables.first_block * bs  # (1, T)
        else:
            slot_mapping = tables.table.gather(1, positions // bs) * bs + positions % bs  # (B, T)
        return AttentionBatch(
            slot_mapping=slot_mapping, positions=positions,
            cos=self.rope_cos[positions][:, :, None], sin=self.rope_sin[positions][:, :, None],
            mask=mask, num_keys=num_keys, gather_index=gather_index(tables, num_keys),
            first_block=tables.first_block, block_size=bs,
        )

    def packed_attention_batch(self, tables: BlockTables, lengths: list[int],
                               starts: list[int]) -> AttentionBatch:
        """The geometry of ``B`` chunks of different lengths packed into one ``(1, T)`` call
        (chunked prefill: every prefill chunk of a step in one forward, whatever its length).

        Row ``b`` brings ``lengths[b]`` tokens at positions ``starts[b]..starts[b]+lengths[b]−1``
        of its blocks ``tables.table[b]``. The projections and MLPs run on the ``T = Σ lengths``
        packed tokens (no padding); only attention scatters the queries into a padded ``(B,
        T_max)`` layout, so each row attends over its own keys (FlashAttention's "varlen" idea
        with a plain gather). Padding never writes KV. Host lists in, so no device sync.
        """
        dev, B, t_max = tables.table.device, len(lengths), max(lengths)
        bs = tables.block_size
        pad_index = torch.tensor([b * t_max + i for b, n in enumerate(lengths) for i in range(n)],
                                 device=dev)  # (T,)
        positions = torch.tensor([s + i for s, n in zip(starts, lengths) for i in range(n)],
                                 device=dev)[None]  # (1, T)
        num_keys = max(s + n for s, n in zip(starts, lengths))
        pad_pos = torch.zeros(B * t_max, dtype=torch.long, device=dev)  # a pad query sees key 0
        pad_pos[pad_index] = positions[0]
        key_pos = torch.arange(num_keys, device=dev)  # (S,)
        mask = _additive_mask(key_pos[None, None, :] <= pad_pos.view(B, t_max, 1),
                              self.dtype)  # (B, 1, T_max, S)
        rows = pad_index // t_max  # (T,) each packed token's row
        slot_mapping = (tables.table[rows, positions[0] // bs] * bs + positions[0] % bs)[None]
        return AttentionBatch(slot_mapping=slot_mapping, positions=positions,
                              cos=self.rope_cos[positions][:, :, None],
                              sin=self.rope_sin[positions][:, :, None], mask=mask,
                              num_keys=num_keys, gather_index=gather_index(tables, num_keys),
                              first_block=tables.first_block, block_size=bs,
                              pad_index=pad_index, max_chunk=t_max)

    def forward_layers(self, hidden: torch.Tensor, start: int, end: int, cache,
                       batch: AttentionBatch) -> torch.Tensor:
        """Run decoder layers ``[start, end)`` on ``(B, T, D)`` hidden states; return ``(B, T, D)``.

        Each layer writes the new tokens' keys and values into ``cache`` at ``batch``'s
        ``slot_mapping`` before attending (``cache.update``), so a later call can continue from
        them.
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
        k_all, v_all = cache.update(i, qk[:, :, H:], qkv[:, :, H + KV:], batch)  # (B, KV, S, hd)
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


def _additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T, S)`` bool (True: a query may attend to a key) → ``(B, 1, T, S)`` additive mask
    (0 or ``-inf``) in ``dtype``. Built once per call: given a bool mask, SDPA converts it in
    every layer (on the CPU, 7 µs a layer of a three-token verify call, 5 % of the call)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(visible.logical_not(), float("-inf"))[:, None]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Hugging Face (rotate-half) layout; ``x`` is ``(B, T, heads, hd)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def gather_index(tables: BlockTables, num_keys: int) -> torch.Tensor | None:
    """``(B · nb,)`` the blocks holding each row's first ``num_keys`` positions, row by row."""
    if tables.first_block is not None:
        return None
    return tables.table[:, :-(-num_keys // tables.block_size)].reshape(-1)


def cache_update(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 batch: AttentionBatch, flat: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``(B, T, KV, hd)`` keys/values at the batch's ``slot_mapping``; read every row's
    first ``S`` positions as ``(B, KV, S, hd)`` (a view of the pool for one sequence with
    consecutive blocks, else one block-granular ``index_select`` per tensor).

    The pools must be contiguous (``engine.kv_cache.KVCache`` makes them so): the view read's
    strides assume it.

    ``flat``: the two pools viewed as ``(positions, KV, hd)``, made once by the
    cache (``engine.kv_cache.KVCache.flat``), which saves two view ops per layer and call; each
    op costs a microsecond or two on the CPU, where a batch-1 layer is a few dozen ops."""
    _, bs, KV, hd = k_cache.shape
    k_flat, v_flat = flat or (k_cache.view(-1, KV, hd), v_cache.view(-1, KV, hd))
    k_flat.index_put_((batch.slot_mapping,), k)
    v_flat.index_put_((batch.slot_mapping,), v)
    S = batch.num_keys
    if batch.first_block is not None:
        # One op for the view ``flat[lo:lo + S][None].transpose(1, 2)`` (three).
        size, stride = (1, KV, S, hd), (S * KV * hd, hd, KV * hd, 1)
        lo = batch.first_block * bs * KV * hd
        return (k_cache.as_strided(size, stride, k_cache.storage_offset() + lo),
                v_cache.as_strided(size, stride, v_cache.storage_offset() + lo))
    index = batch.gather_index
    B = index.numel() // -(-S // bs)  # rows: the index holds nb = ceil(S / bs) blocks per row

    def read(pool: torch.Tensor) -> torch.Tensor:
        return pool.index_select(0, index).view(B, -1, KV, hd)[:, :S].transpose(1, 2)

    return read(k_cache), read(v_cache)
