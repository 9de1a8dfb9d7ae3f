"""The HTTP routes: OpenAI completions, chat and models, health, and Prometheus metrics.

Handlers validate, tokenize, hand ``EngineRequest`` objects to the engine client and format what
comes back; they never touch tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.client import EngineDeadError, EngineOverloadedError
from engine.request import InvalidRequestError
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.requests import chat_requests, completion_requests
from server.responses import ChatFormatter, CompletionFormatter
from server.streaming import stream_events

router = APIRouter()


def _engine(request: Request):
    return request.app.state.engine


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine runs and the server is not draining, 503 otherwise."""
    healthy = _engine(request).is_healthy and not request.app.state.draining
    return JSONResponse({"status": "ok" if healthy else "unhealthy"}, 200 if healthy else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of :mod:`engine.metrics`."""
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The one served model, with its context length (``max_model_len``, tokens)."""
    engine = _engine(request)
    return ModelList(data=[ModelCard(id=engine.model_name, root=engine.model_path,
                                     max_model_len=engine.max_model_len)])


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request):
    """OpenAI ``POST /v1/completions``: choices indexed prompt-major (``P × n``)."""
    engine = _engine(request)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    _check_accepting(request)
    _check_capacity(engine, _num_prompts(body.prompt) * body.n)
    requests, prompts = await _off_loop_if_long(body.prompt, completion_requests, body, engine,
                                                response_id)
    formatter = CompletionFormatter(response_id, engine.model_name, prompts, body.n, body.echo,
                                    engine.decode, int(time.time()))
    return await _respond(request, engine, body, requests, formatter)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """OpenAI ``POST /v1/chat/completions``, through the checkpoint's chat template."""
    engine = _engine(request)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    _check_accepting(request)
    _check_capacity(engine, body.n)
    requests, _ = await _off_loop_if_long(body.messages, chat_requests, body, engine, response_id)
    formatter = ChatFormatter(response_id, engine.model_name, body.n, int(time.time()))
    return await _respond(request, engine, body, requests, formatter)


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
