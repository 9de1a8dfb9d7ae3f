"""Engine configuration: one frozen dataclass built once at the edge (the CLI or a test)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """How to load the model and run the engine.

    Attributes:
        model: a local checkpoint folder.
        served_model_name: the ``model`` name the API answers to (default: the folder's name).
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        dtype: ``"auto"`` (float32 on the CPU, bfloat16 on CUDA), ``"float32"``, ``"float16"``,
            ``"bfloat16"``.
        exit_layer: LayerSkip's exit layer ``E`` (the draft runs layers ``[0, E)``); ``None``
            takes ``assistant_early_exit`` from the checkpoint's generation config.
        num_speculations: the most draft tokens per round ``k_max``; 0 turns speculation off
            (plain decoding); ``None`` takes ``num_assistant_tokens`` from the generation config,
            else :data:`DEFAULT_NUM_SPECULATIONS`.
        adaptive_speculation: choose each round's drafts (``0..k_max``) from measured round
            times and measured acceptance (:mod:`engine.speculation`; calibrated at start-up);
            False drafts ``k_max`` every round.
        draft_vocab_size: the draft's LM head scores only this many most frequent tokens
            (FR-Spec); ``None`` takes the checkpoint's ``draft_vocab.json`` ``draft_vocab_size``
            if it ships one, else the full head; 0 is the full head.
        draft_token_counts: a token-counts file (``models.draft_vocab``) ranking the tokens;
            ``None`` takes the checkpoint folder's ``draft_vocab.json`` if any.
        max_num_seqs: the most sequences decoded together.
        max_num_batched_tokens: tokens per step (vLLM's meaning): decoding rounds (``1 +
            num_speculations`` a sequence) first, then prompt chunks fill the rest (chunked
            prefill; at least one prompt token a step).
        max_model_len: prompt plus completion limit (tokens); ``None`` takes the model's
            ``max_position_embeddings``, capped at :data:`DEFAULT_MAX_MODEL_LEN_CAP`.
        max_waiting_requests: the most sequences that may wait for a slot beyond the
            ``max_num_seqs`` running ones (a request counts one per prompt and choice); the API
            answers 503 with ``Retry-After`` past it. None: no bound.
        allow_long_max_model_len: accept a ``max_model_len`` above the model's
            ``max_position_embeddings`` (vLLM's ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``); without it
            such a length is refused at start-up, since positions past the trained context give
            garbage and the KV cache grows with it.
        block_size: KV cache positions per block (tokens; vLLM's ``--block-size``).
        kv_cache_memory_bytes: the KV cache's memory budget (bytes), which sets the number of
            blocks; None: on CUDA ``gpu_memory_utilization`` of the device, on the CPU what
            ``max_num_seqs`` sequences of ``max_model_len`` need, at most
            :data:`DEFAULT_CPU_KV_CACHE_BYTES`.
        gpu_memory_utilization: CUDA only, without ``kv_cache_memory_bytes``: the fraction of
            the device's memory the engine may hold, weights and KV cache together (vLLM's).
        enable_prefix_caching: reuse the KV blocks of cached prompt prefixes across requests
            (vLLM's automatic prefix caching, on by default as in vLLM v1).
        enforce_eager: never use CUDA graphs (vLLM's ``--enforce-eager``): every decode step,
            draft step and verify call runs eagerly. Without it, on CUDA, start-up captures one
            graph per batch-size bucket, key-length bucket and call kind
            (:mod:`engine.cuda_graphs`); on the CPU graphs are always off.
        seed: seed of the engine's generator, which draws the noise of requests without their
            own ``seed`` (so a whole run repeats for the same arrivals), and of torch's global one.
    """

    model: str
    served_model_name: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    exit_layer: int | None = None
    num_speculations: int | None = None
    adaptive_speculation: bool = True
    draft_vocab_size: int | None = None
    draft_token_counts: str | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting_requests: int | None = None
    allow_long_max_model_len: bool = False
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0


DEFAULT_MAX_MODEL_LEN_CAP = 8192
"""Default ``max_model_len`` ceiling (tokens), so that a 128k-context model's KV cache fits."""

DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30
"""The CPU's default KV cache ceiling (bytes; vLLM's ``VLLM_CPU_KVCACHE_SPACE`` default, 4 GiB)."""

MAX_NUM_SPECULATIONS = 32
"""The largest ``num_speculations``; the KV cache keeps this much room past ``max_model_len``."""

DEFAULT_NUM_SPECULATIONS = 4
"""``k_max`` for checkpoints whose generation config names none (adaptation lowers it)."""
