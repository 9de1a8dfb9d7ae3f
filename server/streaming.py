"""Server-sent events for streamed completions and chats, and the merge of several choices' streams.

Each engine output with new text (or a finish reason) becomes one ``data: {chunk}`` event in the
OpenAI format; the stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from server.errors import error_body
from server.responses import spec_stats, usage_of


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


async def stream_events(streams: list[AsyncIterator], formatter, include_usage: bool,
                        continuous_usage: bool, n: int) -> AsyncIterator[str]:
    """Turn the engine streams of all choices into chunks (``formatter.chunks``), then ``[DONE]``.

    With ``include_usage`` every chunk carries ``"usage": null`` (or, with
    ``continuous_usage``, the running totals) and a last chunk with ``"choices": []`` carries the
    totals and the speculation statistics; without it, the chunk that finishes the last choice
    carries the statistics. An error ends the stream with an error event.
    """
    last: dict = {}  # choice index → its latest RequestOutput
    async for index, out in merge_streams(streams):
        if isinstance(out, Exception):
            yield sse(error_body(str(out), "invalid_request_error" if isinstance(out, ValueError)
                                 else "server_error"))
            break
        if out.error:
            yield sse(error_body(out.error, "server_error"))
            break
        first = index not in last
        last[index] = out
        bodies = formatter.chunks(index, out, first)
        for body in bodies:
            if include_usage:
                body["usage"] = (usage_of(last, n).model_dump()
                                 if continuous_usage else None)
        if bodies and not include_usage and len(last) == len(streams) \
                and all(o.finished for o in last.values()):
            bodies[-1]["spec_decode"] = spec_stats(list(last.values())).model_dump()
        for body in bodies:
            yield sse(body)
    else:
        if include_usage:
            yield sse(formatter.final_chunk(usage_of(last, n),
                                            spec_stats(list(last.values()))))
    yield sse("[DONE]")
