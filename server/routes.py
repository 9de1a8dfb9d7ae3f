"""The HTTP routes: OpenAI completions and models, health, and Prometheus metrics.

Handlers validate, tokenize, hand ``EngineRequest`` objects to the engine client and format what
comes back; they never touch tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.request import EngineRequest, InvalidRequestError
from server.errors import APIError
from server.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, ModelCard,
                             ModelList, SpecDecodeStats)
from server.streaming import completion_events, usage_of

router = APIRouter()


def _engine(request: Request):
    return request.app.state.engine


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine thread runs, 503 otherwise."""
    healthy = _engine(request).is_healthy
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


def _check_supported(body: CompletionRequest) -> None:
    if body.temperature:
        raise APIError(400, "sampling (temperature > 0) is not supported yet; use temperature 0",
                       "temperature")
    if body.stop not in (None, []):
        raise APIError(400, "stop strings are not supported yet", "stop")
    for name in ("logprobs", "suffix"):
        if getattr(body, name) is not None:
            raise APIError(400, f"{name} is not supported yet", name)
    if body.echo:
        raise APIError(400, "echo is not supported yet", "echo")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported yet", name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported yet", "logit_bias")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", "best_of")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")


def _tokenize(prompt, engine) -> list[list[int]]:
    """The prompt field (a string, strings, token ids, or lists of token ids) → token id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    out = []
    for p in prompt:
        if isinstance(p, str):
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(400, f"prompt is not valid Unicode: {exc.reason}", "prompt") from exc
            p = engine.tokenize(p)
        out.append(list(p))
    return out


def _build_requests(body: CompletionRequest, engine, response_id: str) -> list[EngineRequest]:
    requests = []
    for p, ids in enumerate(_tokenize(body.prompt, engine)):
        max_tokens = body.max_tokens or max(1, engine.max_model_len - len(ids))
        try:
            engine.validate(ids, max_tokens)
        except InvalidRequestError as exc:
            param = exc.param if body.max_tokens or exc.param != "max_tokens" else "prompt"
            raise APIError(400, str(exc), param) from exc
        for c in range(body.n):
            requests.append(EngineRequest(f"{response_id}-{p * body.n + c}", tuple(ids), max_tokens,
                                          ignore_eos=body.ignore_eos))
    return requests


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request):
    """OpenAI ``POST /v1/completions``: choices indexed prompt-major (``P × n``)."""
    engine = _engine(request)
    if body.model != engine.model_name:
        raise APIError(404, f"The model `{body.model}` does not exist.", "model", "model_not_found")
    _check_supported(body)
    if not engine.is_healthy:
        raise APIError(503, "the engine is not running", type="server_error")
    response_id = f"cmpl-{uuid.uuid4().hex}"
    requests = _build_requests(body, engine, response_id)
    streams = [engine.generate(r) for r in requests]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            completion_events(streams, response_id, engine.model_name, include_usage, body.n),
            media_type="text/event-stream")
    results = await _gather_unless_disconnected(request, [_collect(s) for s in streams])
    return _completion_response(response_id, engine.model_name, results, body.n)


async def _gather_unless_disconnected(request: Request, coros: list, poll_seconds: float = 0.5):
    """Await all ``coros``; if the client goes away first, cancel them (which aborts their
    engine requests and frees their KV slots) instead of decoding for nobody."""
    task = asyncio.ensure_future(asyncio.gather(*coros))
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_seconds)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "client disconnected")


async def _collect(stream) -> dict:
    text, last = [], None
    try:
        async for out in stream:
            text.append(out.text)
            last = out
    except InvalidRequestError as exc:  # refused by the engine's own validation
        raise APIError(400, str(exc), exc.param) from exc
    if last.error:
        raise APIError(500, last.error, type="server_error")
    return {"text": "".join(text), "out": last}


def _completion_response(response_id: str, model: str, results: list[dict], n: int) -> CompletionResponse:
    choices = [CompletionChoice(index=i, text=r["text"], finish_reason=r["out"].finish_reason)
               for i, r in enumerate(results)]
    outs = [r["out"] for r in results]
    drafted = sum(o.num_draft_tokens for o in outs)
    accepted = sum(o.num_accepted_tokens for o in outs)
    return CompletionResponse(
        id=response_id, model=model, choices=choices,
        usage=usage_of({i: o.num_prompt_tokens for i, o in enumerate(outs)},
                       {i: o.num_output_tokens for i, o in enumerate(outs)}, n),
        spec_decode=SpecDecodeStats(num_draft_tokens=drafted, num_accepted_tokens=accepted,
                                    acceptance_rate=accepted / drafted if drafted else None),
    )
