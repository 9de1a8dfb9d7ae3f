"""Server-sent events for streamed completions, and the merge of several choices' streams.

Each engine output with new text (or a finish reason) becomes one ``data: {chunk}`` event in the
OpenAI format; the stream ends with ``data: [DONE]``. With ``stream_options.include_usage`` every
chunk carries ``"usage": null`` and one last chunk with ``"choices": []`` carries the totals.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from server.errors import error_body
from server.protocol import CompletionChoice, CompletionResponse, UsageInfo


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave async iterators as their items arrive; yield ``(index, item)``.

    An exception from one iterator is yielded as the item. Leaving early (a closed client)
    cancels the rest, whose ``finally`` blocks abort their engine requests.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def completion_events(streams: list[AsyncIterator], response_id: str, model: str,
                            include_usage: bool, n: int) -> AsyncIterator[str]:
    """Turn the engine streams of all choices into OpenAI completion chunks, then ``[DONE]``."""
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[int, int] = {}
    created = int(time.time())  # one timestamp for every chunk of the response, as OpenAI does
    async for index, out in merge_streams(streams):
        if isinstance(out, Exception):
            yield sse(error_body(str(out), "invalid_request_error" if isinstance(out, ValueError)
                                 else "server_error"))
            break
        if out.error:
            yield sse(error_body(out.error, "server_error"))
            break
        prompt_tokens[index], completion_tokens[index] = out.num_prompt_tokens, out.num_output_tokens
        if not out.text and not out.finished:
            continue
        chunk = CompletionResponse(
            id=response_id, model=model, created=created,
            choices=[CompletionChoice(index=index, text=out.text, finish_reason=out.finish_reason)])
        body = chunk.model_dump(exclude_none=True)
        body["choices"][0]["logprobs"] = None
        body["choices"][0]["finish_reason"] = out.finish_reason
        if include_usage:
            body["usage"] = None
        yield sse(body)
    else:
        if include_usage:
            usage = usage_of(prompt_tokens, completion_tokens, n)
            chunk = CompletionResponse(id=response_id, model=model, created=created, choices=[],
                                       usage=usage)
            yield sse(chunk.model_dump(exclude_none=True))
    yield sse("[DONE]")


def usage_of(prompt_tokens: dict[int, int], completion_tokens: dict[int, int], n: int) -> UsageInfo:
    """Totals over all choices (indexed prompt-major): each prompt counted once, however large ``n``."""
    p = sum(v for i, v in prompt_tokens.items() if i % n == 0)
    c = sum(completion_tokens.values())
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
