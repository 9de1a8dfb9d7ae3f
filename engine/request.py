"""The engine's request types: what comes in, the per-sequence state, and what goes out.

One named type per boundary (docs/ARCHITECTURE.md §4): ``EngineRequest`` (from the server) →
``Sequence`` (engine state) → ``RequestOutput`` (a step's delta for one request).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace


class InvalidRequestError(ValueError):
    """A request the engine cannot serve; ``param`` names the field at fault (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class RequestOutputKind(enum.Enum):
    """Which outputs a request's caller receives (vLLM's ``RequestOutputKind``, less CUMULATIVE).

    ``DELTA``: every step's new tokens as they come (streaming). ``FINAL_ONLY``: the same deltas,
    but all handed over at once when the request finishes (a non-streamed response needs nothing
    sooner), so the engine process sends one message per request instead of one per step.
    """

    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, and when to stop (OpenAI's fields, with vLLM's extras).

    Attributes:
        temperature: 0 decodes greedily (whatever ``top_p``/``top_k`` say); else logits / T.
        top_p: nucleus sampling mass in (0, 1]; 1 keeps every token.
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all.
        min_p: drop tokens below ``min_p`` × the most likely token's probability; 0 keeps all.
        seed: makes the request reproducible whatever shares its batch, and identical with
            speculation on or off (see :mod:`engine.sampler`); None draws a key from the engine.
        presence_penalty, frequency_penalty: OpenAI's, in [-2, 2], on the generated tokens.
        repetition_penalty: vLLM's (CTRL, Keskar et al. 2019), > 0, on prompt and generated
            tokens; 1 is off.
        stop: strings that end the completion; the returned text excludes them.
        stop_token_ids: token ids that end the completion (kept, like EOS).
        logprobs: return this many top log-probabilities (of the full model) per generated token,
            plus the chosen token's; None returns none.
        prompt_logprobs: the same for every prompt token (the first one has none).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether tokens are the (penalised) argmax."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty changes the logits."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class EngineRequest:
    """One completion to generate (one prompt, one choice).

    Attributes:
        request_id: unique among live requests.
        prompt_token_ids: the prompt (tokens).
        max_tokens: the most tokens to generate; exactly this many come out unless a stop comes
            first. 0 only scores the prompt (with ``sampling.prompt_logprobs``).
        ignore_eos: keep generating past EOS.
        arrival_time: ``time.monotonic()`` when the server received it (seconds).
        sampling: token choice and stops; greedy by default.
        exit_layer: this request's draft exit layer (None: the engine's).
        num_speculations: this request's drafts per round, fixed (0: speculation off; None: the
            engine's, adapted to the request's acceptance).
        group_id: the client request this one belongs to (the prompts and ``n`` choices of one
            HTTP request share it); the scheduler admits waiting sequences round robin by group.
            None: its own ``request_id``.
        output_kind: when its outputs are handed over (:class:`RequestOutputKind`).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    ignore_eos: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    sampling: SamplingParams = GREEDY
    exit_layer: int | None = None
    num_speculations: int | None = None
    group_id: str | None = None
    output_kind: RequestOutputKind = RequestOutputKind.DELTA


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
    ``num_computed_tokens -= num_rejected``). Its KV lives in the blocks of ``block_table``
    (:mod:`engine.kv_cache`). A preempted sequence gives its blocks back, goes back to waiting
    with ``num_computed_tokens = 0`` and later recomputes its tokens (vLLM's recompute
    preemption): :attr:`num_prefill_tokens` is then everything but its last token.
    """

    def __init__(self, request: EngineRequest):
        self.request = request
        self.request_id = request.request_id
        self.group_id = request.group_id or request.request_id
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []  # its KV blocks (vLLM's block_table)
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens its first admission found in the prefix cache
        self.num_preemptions = 0
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.scheduled_time: float | None = None  # when the scheduler admitted it (seconds)
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None  # when its latest tokens came out (seconds)
        self.output_text = ""  # decoded output so far, cut at a stop string
        self.num_sent_chars = 0  # of output_text, already handed out
        self.stop_reason: int | str | None = None  # the stop string or token id that ended it
        self.spec = None  # its adaptive-speculation state (engine.speculation.SpecState)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_prefill_tokens(self) -> int:
        """Positions to compute before decoding: the prompt, or after a preemption every token
        but the last (which the next round feeds in, as for any decoding sequence)."""
        return self.num_prompt_tokens if len(self.token_ids) == self.num_prompt_tokens \
            else len(self.token_ids) - 1

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class TokenLogprob:
    """One token's log-probability under the full model, with the most likely alternatives.

    Attributes:
        token_id: the token.
        token: its text (``tokenizer.decode([token_id])``).
        logprob: natural log-probability (of the model's raw distribution, before temperature,
            penalties or truncation, as vLLM's default ``raw_logprobs``).
        top_logprobs: the ``n`` most likely ``(token text, token id, logprob, token bytes)``,
            most likely first.
        token_bytes: the token's raw bytes (part of a character for some byte-level tokens,
            whose ``token`` text is then U+FFFD).
    """

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[tuple[str, int, float, bytes]]
    token_bytes: bytes = b""


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
        num_cached_tokens: prompt tokens whose KV came from the prefix cache (tokens).
        error: the message when ``finish_reason == "error"``.
        logprobs: one entry per token of ``token_ids`` when the request asked for logprobs.
        prompt_logprobs: with the first output only, one entry per prompt token after the first.
        stop_reason: the stop string or token id that finished the request (vLLM's field).
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        """Whether this is the request's last output."""
        return self.finish_reason is not None

    @staticmethod
    def merge(outputs: list["RequestOutput"]) -> "RequestOutput":
        """One request's consecutive deltas as one output (vLLM's ``FINAL_ONLY`` hands over
        exactly one): tokens, text and logprobs concatenated, the prompt logprobs of the first,
        the running totals, finish and error of the last."""
        first, last = outputs[0], outputs[-1]
        logprobs = [lp for o in outputs for lp in (o.logprobs or [])]
        return replace(
            last, token_ids=[t for o in outputs for t in o.token_ids],
            text="".join(o.text for o in outputs),
            logprobs=logprobs if any(o.logprobs is not None for o in outputs) else None,
            prompt_logprobs=first.prompt_logprobs)
