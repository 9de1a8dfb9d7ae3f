"""The engine's request types: what comes in, the per-sequence state, and what goes out.

One named type per boundary (ARCHITECTURE.md §4): ``EngineRequest`` (from the server) →
``Sequence`` (engine state) → ``RequestOutput`` (a step's delta for one request).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request the engine cannot serve; ``param`` names the field at fault (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EngineRequest:
    """One completion to generate (one prompt, one choice).

    Attributes:
        request_id: unique among live requests.
        prompt_token_ids: the prompt (tokens).
        max_tokens: the most tokens to generate; exactly this many come out unless a stop comes first.
        ignore_eos: keep generating past EOS.
        arrival_time: ``time.monotonic()`` when the server received it (seconds).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    ignore_eos: bool = False
    arrival_time: float = field(default_factory=time.monotonic)


class SequenceStatus(enum.IntEnum):
    """Ordered like vLLM's: every finished state sorts after every live one."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5

    @property
    def is_finished(self) -> bool:
        """Whether the sequence has left the engine."""
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI ``finish_reason`` (``stop``, ``length``), ``abort``/``error``, or None if live."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}


class Sequence:
    """A request's decoding state.

    ``token_ids`` holds the prompt then the output. ``num_computed_tokens`` counts the positions
    whose KV is valid in every layer: after prefill and after every round it is
    ``len(token_ids) − 1`` (the last token is sampled but not yet run through the model), and a
    speculative round's rollback is exactly that assignment (vLLM's
    ``num_computed_tokens -= num_rejected``).
    """

    def __init__(self, request: EngineRequest):
        self.request = request
        self.request_id = request.request_id
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.slot: int | None = None
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.first_token_time: float | None = None

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class RequestOutput:
    """What one step produced for one request: a delta, plus running totals.

    Attributes:
        request_id: the request.
        token_ids: the new tokens of this step (after stop cuts).
        text: the new text of this step (UTF-8 safe: partial characters are held back).
        finish_reason: ``stop``, ``length``, ``abort`` or ``error`` once finished, else None.
        num_prompt_tokens, num_output_tokens: usage so far (tokens).
        num_draft_tokens, num_accepted_tokens: the request's speculation totals (tokens).
        error: the message when ``finish_reason == "error"``.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether this is the request's last output."""
        return self.finish_reason is not None
