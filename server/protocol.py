"""OpenAI request and response models (pydantic), with vLLM's extra fields where we support them.

Unknown fields are ignored (clients such as guidellm send some). Field names are the OpenAI API's.
"""

from __future__ import annotations

import time
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the totals."""

    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(BaseModel):
    """``POST /v1/completions``.

    ``temperature`` 0 or absent decodes greedily; sampling (``temperature > 0``) is refused with a
    400 in this version. ``max_tokens`` null means "up to the context length". Types are strict
    (``"10"`` is not an integer, ``true`` is not a token id), as in the OpenAI API.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)
    model: str
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    best_of: int | None = Field(default=None, ge=1)
    logit_bias: dict[str, float] | None = None


class CompletionChoice(BaseModel):
    """One choice of a completion (or its delta in a stream chunk)."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class UsageInfo(BaseModel):
    """Token counts (tokens)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpecDecodeStats(BaseModel):
    """The request's self-speculation totals (an extension field, ``spec_decode``)."""

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
