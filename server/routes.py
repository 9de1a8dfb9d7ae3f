"""The HTTP routes: OpenAI completions, chat and models, vLLM's tokenizer endpoints and
``/version``, health, and Prometheus metrics.

Handlers validate, tokenize, hand ``EngineRequest`` objects to the engine client and format what
comes back; they never touch tensors. Each route declares the responses it can give (the error
statuses with the OpenAI error schema, ``text/event-stream`` for streams), so the OpenAPI
document (``server.openapi``) tells the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from engine.client import EngineDeadError, EngineOverloadedError
from engine.request import InvalidRequestError
from server import package_version
from server.errors import APIError
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                             CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                             ErrorResponse, HealthResponse, ModelCard, ModelList,
                             TokenizeResponse, VersionResponse)
from server.requests import chat_requests, completion_requests
from server.responses import ChatFormatter, CompletionFormatter
from server.streaming import stream_events
from server.tokenization import TokenizeRequest, detokenize, tokenize

router = APIRouter()
dev_router = APIRouter()
"""Development endpoints, served only with ``--server-dev-mode`` (vLLM's
``VLLM_SERVER_DEV_MODE``): benchmarks use them, production servers leave them off."""

ERRORS = {
    400: "invalid request: a wrong type, a value out of range, a prompt too long (the error "
         "names the parameter)",
    404: "the model is not the one served",
    413: "the request body is larger than --max-request-body-bytes",
    503: "the engine is not running, or the server is shutting down",
}


def _errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries for error statuses, all with the OpenAI error schema."""
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


def _stream_or_json(model) -> dict:
    """A 200 that is JSON (``model``), or server-sent events when the body asks to stream. The
    event-stream schema describes one event, as OpenAPI 3.2 reads a ``schema`` without
    ``itemSchema`` (and schemathesis checks it so)."""
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": f"one chunk as JSON (a {model.__name__} whose choices "
        "carry deltas), an {\"error\": ...} object if the request fails midway, or [DONE] "
        "last"}}}
    return {200: {"model": model, "description": "the whole response as JSON, or with "
                  "\"stream\": true a text/event-stream of chunks ending in data: [DONE]",
                  "content": {"text/event-stream": {"schema": event}}}}


def _engine(request: Request):
    return request.app.state.engine


@router.get("/health", response_model=None, responses={
    200: {"model": HealthResponse, "description": "the engine runs"},
    503: {"model": HealthResponse, "description": "the engine stopped, or the server drains"}})
async def health(request: Request) -> Response:
    """200 while the engine runs and the server is not draining, 503 otherwise."""
    healthy = _engine(request).is_healthy and not request.app.state.draining
    return JSONResponse({"status": "ok" if healthy else "unhealthy"}, 200 if healthy else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of :mod:`engine.metrics`."""
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/version")
async def version() -> VersionResponse:
    """The server's version (the installed package's, as vLLM's ``/version``)."""
    return VersionResponse(version=package_version())


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The one served model, with its context length (``max_model_len``, tokens)."""
    engine = _engine(request)
    return ModelList(data=[ModelCard(id=engine.model_name, root=engine.model_path,
                                     max_model_len=engine.max_model_len)])


@router.post("/v1/completions", response_model=None,
             responses={**_stream_or_json(CompletionResponse), **_errors(400, 404, 413, 503)})
async def create_completion(body: CompletionRequest, request: Request):
    """OpenAI ``POST /v1/completions``: choices indexed prompt-major (``P × n``)."""
    engine = _engine(request)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    _check_accepting(request)
    _check_capacity(engine, _num_prompts(body.prompt) * body.n)
    requests, prompts = await _off_loop_if_long(body.prompt, completion_requests, body, engine,
                                                response_id)
    formatter = CompletionFormatter(response_id, engine.model_name, prompts, body.n, body.echo,
                                    engine.decode_prompt, int(time.time()),
                                    engine.detokenizer,
                                    return_token_ids=body.return_token_ids)
    return await _respond(request, engine, body, requests, formatter)


@router.post("/v1/chat/completions", response_model=None,
             responses={**_stream_or_json(ChatCompletionResponse), **_errors(400, 404, 413, 503)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """OpenAI ``POST /v1/chat/completions``, through the checkpoint's chat template."""
    engine = _engine(request)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    _check_accepting(request)
    _check_capacity(engine, body.n)
    requests, prompts = await _off_loop_if_long(body.messages, chat_requests, body, engine,
                                                response_id)
    formatter = ChatFormatter(response_id, engine.model_name, body.n, int(time.time()),
                              prompts[0].token_ids, body.return_token_ids)
    return await _respond(request, engine, body, requests, formatter)


@router.post("/tokenize", responses=_errors(400, 404, 413))
async def tokenize_route(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """vLLM's ``POST /tokenize``: a prompt's tokens, or chat messages' through the template."""
    text = getattr(body, "prompt", None) or getattr(body, "messages", None)
    return await _off_loop_if_long(text, tokenize, body, _engine(request))


INLINE_DETOKENIZE_TOKENS = 2048
"""Shorter token lists are decoded on the event loop, longer ones in a worker thread."""


@router.post("/detokenize", responses=_errors(400, 404, 413))
async def detokenize_route(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """vLLM's ``POST /detokenize``: token ids → text."""
    if len(body.tokens) < INLINE_DETOKENIZE_TOKENS:
        return detokenize(body, _engine(request))
    return await asyncio.to_thread(detokenize, body, _engine(request))


INLINE_TEXT_CHARS = 8192
"""Prompts with less text than this are tokenized on the event loop (tens of microseconds, less
than a hop to a worker thread and back); longer ones in a worker thread."""


async def _off_loop_if_long(prompt, build, *args):
    """``build(*args)``, in a worker thread when ``prompt`` holds much text to tokenize."""
    if _text_chars(prompt) < INLINE_TEXT_CHARS:
        return build(*args)
    return await asyncio.to_thread(build, *args)


def _text_chars(prompt) -> int:
    """Characters of text in a prompt field or a message list (token ids count nothing)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(_text_chars(p) for p in prompt)
    content = getattr(prompt, "content", None)  # a chat message
    if content is not None:
        return _text_chars(content)
    return len(getattr(prompt, "text", "") or "")  # a text part


def _check_accepting(request: Request) -> None:
    """503 while the server drains for shutdown (new work would only be cut off)."""
    if request.app.state.draining:
        raise APIError(503, "the server is shutting down", type="server_error")


def _num_prompts(prompt) -> int:
    """Prompts in a completions ``prompt`` field: a string or one token-id list is one."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _check_capacity(engine, num_seqs: int, reserve: list[str] | None = None) -> None:
    """Refuse a request the waiting queue has no room for: 503 with ``Retry-After``, answered
    from the API process's own count of outstanding sequences (no round trip to the engine).

    503 rather than 429: the server as a whole is out of capacity, not this client over a quota
    of its own; 503 + ``Retry-After`` is what load balancers and the ``openai`` client's retry
    loop treat as "try again shortly, maybe elsewhere" (README, "Overload").
    """
    try:
        if reserve is None:
            engine.check_capacity(num_seqs)
        else:
            engine.reserve(reserve)
    except EngineOverloadedError as exc:
        raise APIError(503, str(exc), type="server_error", code="server_overloaded",
                       headers={"Retry-After": str(exc.retry_after)}) from exc
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), exc.param) from exc


async def _respond(request: Request, engine, body, requests, formatter):
    _check_capacity(engine, len(requests), reserve=[r.request_id for r in requests])
    streams = [engine.generate(r) for r in requests]
    if body.stream:
        options = body.stream_options
        return StreamingResponse(
            stream_events(streams, formatter, bool(options and options.include_usage),
                          bool(options and options.continuous_usage_stats), body.n),
            media_type="text/event-stream")
    results = await _gather_unless_disconnected(request, [_collect(s) for s in streams])
    response = formatter.whole(results)
    whole = response.model_dump(exclude_none=True)
    whole["spec_decode"] = response.spec_decode.model_dump()  # acceptance_rate null, not absent
    for choice in whole["choices"]:
        choice.setdefault("logprobs", None)
        choice.setdefault("stop_reason", None)
    return JSONResponse(whole)


async def _gather_unless_disconnected(request: Request, coros: list, poll_seconds: float = 0.5):
    """Await all ``coros``; if the client goes away first, or one of them fails, cancel the others
    (which aborts their engine requests and frees their KV slots) instead of decoding for nobody."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=poll_seconds,
                                               return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                raise failed[0].exception()
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise APIError(499, "client disconnected")
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(stream) -> list:
    """Every output of one choice."""
    outs = []
    try:
        async for out in stream:
            outs.append(out)
    except InvalidRequestError as exc:  # refused by the engine's own validation
        raise APIError(400, str(exc), exc.param) from exc
    except EngineDeadError as exc:  # the engine stopped, died, or the server is shutting down
        raise APIError(503, str(exc), type="server_error") from exc
    except RuntimeError as exc:  # a step failed after finishing this one
        raise APIError(500, str(exc), type="server_error") from exc
    if outs[-1].error:
        raise APIError(500, outs[-1].error, type="server_error")
    return outs


@dev_router.post("/reset_prefix_cache", response_class=Response, responses={
    200: {"description": "the cache was reset (an empty body)", "content": None},
    503: {"model": ErrorResponse, "description": "the engine is not running"}})
async def reset_prefix_cache(request: Request) -> Response:
    """Forget the prefix cache's blocks (vLLM's endpoint of the same name): a prompt sent after
    the response is prefilled from scratch, except for the blocks of requests still running
    (those stay cached). Only with ``--server-dev-mode``."""
    engine = _engine(request)
    if not engine.is_healthy:
        raise APIError(503, "the engine is not running", type="server_error")
    engine.reset_prefix_cache()
    return Response(status_code=200)
