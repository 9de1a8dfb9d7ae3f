"""HTTP bodies → engine requests: checks, tokenization, chat templating, sampling parameters.

Every refusal is an :class:`~server.errors.APIError`: a 400 that names the parameter, a 404 for
an unknown model, a 503 when the engine is down. Nothing here touches tensors or engine state
(the engine's own checks run through ``engine.validate_request``, which is read-only).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import EngineRequest, InvalidRequestError, RequestOutputKind, SamplingParams
from server.errors import APIError
from server.protocol import (MAX_CHOICES, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS,
                             ChatCompletionRequest, CompletionRequest, SamplingFields)

MIN_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily (vLLM's ``_SAMPLING_EPS``)."""


@dataclass
class PromptInfo:
    """One prompt of a request: its tokens, and its text when the client sent text."""

    token_ids: list[int]
    text: str | None


def check_model(model: str | None, engine) -> None:
    """404 unless ``model`` is the served model's name (None counts as the served model, as in
    vLLM's tokenizer endpoints).

    Raises:
        APIError: 404 ``model_not_found``.
    """
    if model is not None and model != engine.model_name:
        name = model.encode("utf-8", "backslashreplace").decode()  # a lone surrogate too
        raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")


def check_common(body: SamplingFields, engine) -> None:
    """The checks completions and chat share: model name, health, unsupported fields, and the
    caps on stop strings (:data:`~server.protocol.MAX_STOP_STRINGS` strings of at most
    :data:`~server.protocol.MAX_STOP_STRING_CHARS` characters)."""
    check_model(body.model, engine)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop sequences are allowed, "
                            f"got {len(body.stop)}", "stop")
    if body.stop is not None and any(s == "" for s in _stops(body.stop)):
        raise APIError(400, "stop sequences must not be empty", "stop")
    longest = max((len(s) for s in _stops(body.stop)), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise APIError(400, f"stop sequences may have at most {MAX_STOP_STRING_CHARS} characters, "
                            f"got one of {longest}", "stop")
    if not engine.is_healthy:
        raise APIError(503, "the engine is not running", type="server_error")


def _stops(stop) -> tuple[str, ...]:
    return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)


def _check_length(text: str, engine, param: str) -> None:
    """A text too long to fit in ``max_model_len`` tokens whatever it holds is refused before
    tokenizing it (which takes seconds for megabytes)."""
    check_text_length(len(text), engine, param)


def check_text_length(chars: int, engine, param: str) -> None:
    """Refuse ``chars`` characters of prompt text that cannot fit in ``max_model_len`` tokens.

    Raises:
        APIError: 400 naming ``param``, when ``chars`` exceeds ``engine.max_prompt_chars``.
    """
    if chars > engine.max_prompt_chars:
        raise APIError(400, f"This model's maximum context length is {engine.max_model_len} "
                            f"tokens. However, your {param} has {chars} characters, more "
                            f"than {engine.max_model_len} tokens of this tokenizer can hold "
                            f"({engine.max_prompt_chars} characters).", param)


def check_text(text: str, param: str) -> None:
    """400 naming ``param`` when ``text`` cannot be encoded as UTF-8 (a lone surrogate).

    Raises:
        APIError: 400.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode: {exc.reason}", param) from exc


def sampling_params(body: SamplingFields, defaults: dict, seed_offset: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's :class:`SamplingParams`; an absent field takes the checkpoint's
    ``generation_config.json`` default (``defaults``), else OpenAI's. Choice ``c`` of a seeded
    request uses ``seed + c``, so that ``n`` choices differ. A temperature below
    :data:`MIN_TEMPERATURE` is greedy, as in vLLM."""
    def pick(name, fallback):
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, fallback)

    temperature = float(pick("temperature", 1.0))
    if temperature < MIN_TEMPERATURE:  # logits / T would overflow float32: greedy, as vLLM
        temperature = 0.0
    top_k = max(0, int(pick("top_k", 0)))  # the sampler clamps it to the vocabulary
    return SamplingParams(
        temperature=temperature, top_p=float(pick("top_p", 1.0)),
        top_k=top_k, min_p=float(pick("min_p", 0.0)),
        seed=None if body.seed is None else body.seed + seed_offset,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        stop=_stops(body.stop), stop_token_ids=tuple(body.stop_token_ids or ()),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _engine_requests(body: SamplingFields, engine, response_id: str, prompts: list[PromptInfo],
                     max_tokens: int | None, max_tokens_param: str, logprobs: int | None,
                     prompt_logprobs: int | None, prompt_param: str = "prompt"
                     ) -> list[EngineRequest]:
    """``P × n`` engine requests, prompt-major, each checked by the engine; ``prompt_param``
    names the field a prompt error blames (chat: ``messages``)."""
    requests = []
    for p, prompt in enumerate(prompts):
        ids = prompt.token_ids
        room = engine.max_model_len - len(ids)
        if max_tokens is None and room < 1:
            raise APIError(400, f"This model's maximum context length is {engine.max_model_len} "
                                f"tokens. However, your prompt has {len(ids)} tokens, which "
                                "leaves no room for the completion.", prompt_param)
        limit = room if max_tokens is None else max_tokens
        for c in range(body.n):
            request = EngineRequest(
                f"{response_id}-{p * body.n + c}", tuple(ids), limit, ignore_eos=body.ignore_eos,
                sampling=sampling_params(body, engine.default_sampling, c, logprobs,
                                         prompt_logprobs),
                exit_layer=body.exit_layer, num_speculations=body.num_speculations,
                group_id=response_id,
                output_kind=(RequestOutputKind.DELTA if body.stream
                             else RequestOutputKind.FINAL_ONLY))
            try:
                engine.validate_request(request)
            except InvalidRequestError as exc:
                # A prompt that alone fills the context is the prompt's fault, not max_tokens'.
                too_long = max_tokens is None or len(ids) >= engine.max_model_len
                param = ("prompt" if too_long else max_tokens_param) \
                    if exc.param == "max_tokens" else exc.param
                param = prompt_param if param == "prompt" else param
                raise APIError(400, str(exc), param) from exc
            requests.append(request)
    return requests


def completion_requests(body: CompletionRequest, engine, response_id: str
                        ) -> tuple[list[EngineRequest], list[PromptInfo]]:
    """Check a completions body and build its engine requests (and its prompts, for ``echo``)."""
    check_common(body, engine)
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo)", "max_tokens")
    _check_choices(body.n, _num_prompts(body.prompt))
    prompts = _tokenize(body.prompt, engine)
    prompt_logprobs = body.logprobs if body.echo else None
    requests = _engine_requests(body, engine, response_id, prompts, body.max_tokens,
                                "max_tokens", body.logprobs, prompt_logprobs)
    return requests, prompts


def _num_prompts(prompt) -> int:
    """How many prompts a completions ``prompt`` field holds (a token-id list is one)."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _check_choices(n: int, num_prompts: int) -> None:
    """400 when ``n × num_prompts`` passes :data:`~server.protocol.MAX_CHOICES` (checked before
    anything is tokenized)."""
    if n * num_prompts > MAX_CHOICES:
        param = "n" if n > 1 else "prompt"
        raise APIError(400, f"a request may ask for at most {MAX_CHOICES} choices (n × the number "
                            f"of prompts), got {n} × {num_prompts} = {n * num_prompts}", param)


def _tokenize(prompt, engine) -> list[PromptInfo]:
    """The prompt field (a string, strings, token ids, or lists of token ids) → prompts."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [PromptInfo(list(prompt), None)]
    out = []
    for p in prompt:
        if isinstance(p, str):
            check_text(p, "prompt")
            _check_length(p, engine, "prompt")
            out.append(PromptInfo(engine.tokenize(p), p))
        else:
            out.append(PromptInfo(list(p), None))
    return out


def chat_messages(messages) -> list[dict]:
    """``ChatMessage`` models → the ``{"role", "content"}`` dicts a chat template takes (text
    parts joined).

    Raises:
        APIError: 400 naming ``messages`` for content that is not valid Unicode.
    """
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None \
            else "".join(part.text for part in m.content)
        check_text(content or "", "messages")
        out.append({"role": m.role, "content": content or ""})
    return out


def chat_requests(body: ChatCompletionRequest, engine, response_id: str
                  ) -> tuple[list[EngineRequest], list[PromptInfo]]:
    """Check a chat body, apply the chat template and build its engine requests."""
    check_common(body, engine)
    if body.tools:
        raise APIError(400, "tools are not supported", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "response_format other than text is not supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    messages = chat_messages(body.messages)
    _check_length("".join(m["content"] for m in messages), engine, "messages")
    try:
        ids = engine.apply_chat_template(messages, body.add_generation_prompt)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), exc.param) from exc
    max_tokens = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = _engine_requests(body, engine, response_id, [PromptInfo(ids, None)], max_tokens,
                                param, logprobs, None, prompt_param="messages")
    return requests, [PromptInfo(ids, None)]
