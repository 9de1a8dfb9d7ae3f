"""What the API side needs of the engine without the model: limits, tokenizer, request checks.

The engine core builds one :class:`EngineInfo` when it has loaded the checkpoint and hands it to
the API process (pickled, tokenizer included), which then tokenizes, applies chat templates and
checks requests itself, off the engine's process (vLLM v1's ``Processor``). The checks here are
the engine's own: ``EngineCore.add_request`` runs the same :func:`check_request`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import MAX_NUM_SPECULATIONS
from engine.request import EngineRequest, InvalidRequestError


@dataclass(frozen=True)
class EngineInfo:
    """The served model as the API sees it.

    Attributes:
        model_name: the name the API serves the model under.
        model_path: the checkpoint folder or file.
        max_model_len: prompt plus completion limit (tokens).
        vocab_size: rows of the embedding table (token ids must be below it).
        num_layers: decoder layers ``L`` (``exit_layer`` must be in ``1..L``).
        default_sampling: the checkpoint's generation-config sampling defaults.
        tokenizer: the checkpoint's transformers tokenizer.
        max_token_chars: the most characters one vocabulary entry decodes to, so that a text of
            more than ``max_model_len × max_token_chars`` characters cannot fit and is refused
            before it is tokenized.
        num_kv_cache_bytes: the KV cache's size (bytes).
        cpu_threads: torch intra-op threads of the engine (None when the caller did not set them).
        device: the device the weights are on (``cpu``, ``cuda:0``).
        dtype: the weights' and KV cache's dtype (``float32``, ``bfloat16``).
        exit_layer: the engine's default exit layer ``E``.
        max_num_seqs: sequences the engine runs at once.
        max_waiting_requests: the most sequences that may wait beyond those (None: no bound);
            the API process counts its outstanding sequences against ``max_num_seqs +
            max_waiting_requests`` and refuses past it without asking the engine.
    """

    model_name: str
    model_path: str
    max_model_len: int
    vocab_size: int
    num_layers: int
    default_sampling: dict
    tokenizer: object = field(repr=False)
    max_token_chars: int = 1
    num_kv_cache_bytes: int = 0
    cpu_threads: int | None = None
    device: str = ""
    dtype: str = ""
    exit_layer: int = 0
    max_num_seqs: int = 1
    max_waiting_requests: int | None = None


def max_token_chars(tokenizer) -> int:
    """The longest decoded text of one token of ``tokenizer`` (characters, at least 1)."""
    vocab = tokenizer.get_vocab()
    longest = max(vocab, key=len, default="")
    # A vocabulary entry's surface form (byte-level BPE's "Ġ", SentencePiece's "▁") is never
    # shorter than its text, but added tokens decode to themselves; both bounds hold.
    return max(1, len(longest), len(tokenizer.decode([vocab[longest]])) if longest else 1)


def check_prompt(prompt_token_ids, max_tokens: int, vocab_size: int, max_model_len: int) -> None:
    """Check a prompt and ``max_tokens`` against the model's limits.

    Raises:
        InvalidRequestError: an empty prompt, a token id outside the vocabulary,
            ``max_tokens < 0``, or prompt plus ``max_tokens`` over ``max_model_len`` (both numbers
            named); its ``param`` is ``prompt`` or ``max_tokens``.
    """
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if max_tokens < 0:
        raise InvalidRequestError(f"max_tokens must be at least 0, got {max_tokens}", "max_tokens")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})", "prompt")
    if n + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"you requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} for "
            "the completion). Please reduce the prompt or max_tokens.", "max_tokens")


def check_request(request: EngineRequest, vocab_size: int, max_model_len: int,
                  num_layers: int) -> None:
    """:func:`check_prompt`, plus the speculation extras and ``stop_token_ids``.

    Raises:
        InvalidRequestError: a value out of range, naming the parameter.
    """
    check_prompt(request.prompt_token_ids, request.max_tokens, vocab_size, max_model_len)
    L = num_layers
    if request.exit_layer is not None and not 1 <= request.exit_layer <= L:
        raise InvalidRequestError(f"exit_layer must be in 1..{L}, got {request.exit_layer}",
                                  "exit_layer")
    k = request.num_speculations
    if k is not None and not 0 <= k <= MAX_NUM_SPECULATIONS:
        raise InvalidRequestError(
            f"num_speculations must be in 0..{MAX_NUM_SPECULATIONS}, got {k}", "num_speculations")
    bad = [t for t in request.sampling.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"stop_token_ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})",
            "stop_token_ids")


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        add_special_tokens: bool = False) -> list[int]:
    """Render ``messages`` with the tokenizer's chat template (transformers) and tokenize
    (``add_special_tokens``: the tokenizer's own, such as a BOS, on top of the template's).

    Raises:
        InvalidRequestError: no chat template, or the template refused the messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "this model has no chat template; use /v1/completions, or serve a checkpoint "
            "whose tokenizer_config.json or chat_template.jinja defines one", "messages")
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2 TemplateError, raise_exception() in the template
        raise InvalidRequestError(f"the chat template refused the messages: {exc}",
                                  "messages") from exc
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)
