"""OpenAI request and response models (pydantic), with vLLM's extra fields.

Unknown fields are ignored (clients such as guidellm send some). Field names are the OpenAI API's;
the extras are vLLM's (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids``, ``stream_options.continuous_usage_stats``) and LayerSkip's (``exit_layer``,
``num_speculations``). Types are strict (``"10"`` is not an integer, ``true`` is not a token id)
and numbers finite, as in the OpenAI API.
"""

from __future__ import annotations

import time
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4
"""The most ``stop`` strings per request (OpenAI's limit)."""
MAX_STOP_STRING_CHARS = 1024
"""The longest ``stop`` string (characters): streamed text is held back up to this much while
it might be the start of a stop string, and every step checks each string."""
MAX_STOP_TOKEN_IDS = 1024
"""The most ``stop_token_ids`` per request: every step checks every generated token against
them (a million ids made another user's request 3× slower)."""
MAX_CHOICES = 4096
"""The most choices one request may ask for, ``n`` × the number of prompts: each is a sequence of
its own in the batch. Admission is round robin by request (``engine.scheduler``), so a large
request does not hold others behind it; the engine's queue bound (``--max-num-seqs`` +
``--max-waiting-requests``) refuses a request larger than it can ever queue, too."""
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
INT64 = 2**63


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the totals;
    ``continuous_usage_stats`` (vLLM) puts the running totals on every chunk."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Strict):
    """The fields completions and chat share: sampling, stops, and the extras."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    user: str | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # Below 1e-6, logits / penalty overflow float32 (NaN scores, garbage tokens).
    repetition_penalty: float | None = Field(default=None, ge=1e-6, le=10.0)
    logit_bias: dict[str, float] | None = None
    exit_layer: int | None = None
    num_speculations: int | None = None
    return_token_ids: bool = False


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``.

    ``temperature`` absent takes the checkpoint's ``generation_config.json`` value, else 1.0 (as
    vLLM); 0 decodes greedily. ``max_tokens`` null or absent means "up to the context length";
    0 is allowed with ``echo`` (score the prompt only). ``logprobs`` 0..5.
    """

    prompt: Prompt
    max_tokens: int | None = Field(default=None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class TextPart(_Strict):
    """A ``{"type": "text", "text": ...}`` content part."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; ``content`` a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: the messages go through the checkpoint's chat template.

    ``max_completion_tokens`` (or the older ``max_tokens``) null or absent means "up to the
    context length". ``logprobs`` true returns the chosen tokens' logprobs, with
    ``top_logprobs`` (0..20) alternatives each. ``tools`` are not supported (400).
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: list[dict] | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True


class CompletionLogprobs(BaseModel):
    """The legacy completions ``logprobs`` object: one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One choice of a completion (or its delta in a stream chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class PromptTokensDetails(BaseModel):
    """OpenAI's ``usage.prompt_tokens_details``: ``cached_tokens``, the prompt tokens whose KV
    came from the prefix cache (tokens)."""

    cached_tokens: int = 0


class UsageInfo(BaseModel):
    """Token counts (tokens)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class SpecDecodeStats(BaseModel):
    """The request's self-speculation totals over all its choices (extension field
    ``spec_decode``); ``acceptance_rate`` is accepted / drafted, null when nothing was drafted."""

    num_draft_tokens: int
    num_accepted_tokens: int
    acceptance_rate: float | None


class CompletionResponse(BaseModel):
    """A whole completion, or one SSE chunk of it (``object`` is ``text_completion`` for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    spec_decode: SpecDecodeStats | None = None


class TopLogprob(BaseModel):
    """A chat alternative token."""

    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    """A chat output token with its alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """The chat ``logprobs`` object."""

    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    """The assistant's message (or a stream delta of it)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    """One chat choice (``message``), or one chunk's choice (``delta``)."""

    index: int
    message: ChatResponseMessage | None = None
    delta: ChatResponseMessage | None = None
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    """``chat.completion``, or a ``chat.completion.chunk``."""

    id: str
    object: Literal["chat.completion", "chat.completion.chunk"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    spec_decode: SpecDecodeStats | None = None
    prompt_token_ids: list[int] | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "layerskip"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The OpenAI error body's ``error`` object."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``, the OpenAI error shape."""

    error: ErrorInfo


class HealthResponse(BaseModel):
    """``GET /health``: ``ok`` (200) or ``unhealthy`` (503)."""

    status: Literal["ok", "unhealthy"]


class TokenizeCompletionRequest(_Strict):
    """``POST /tokenize`` with a ``prompt`` (vLLM's shape): ``add_special_tokens`` adds the
    tokenizer's BOS as completions do; ``return_token_strs`` adds each token's vocabulary entry."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    """``POST /tokenize`` with ``messages``, through the chat template as chat completions use it
    (vLLM's shape; ``add_special_tokens`` defaults to false, the template holds them)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """``POST /tokenize``'s answer: ``count`` tokens (``max_model_len`` is the context limit)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    """``POST /detokenize``: token ids → text (special tokens kept, as vLLM)."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """``POST /detokenize``'s answer."""

    prompt: str


class VersionResponse(BaseModel):
    """``GET /version``: the installed ``layerskip-serve`` package's version."""

    version: str
