"""ASGI middleware that keeps huge bodies off the event loop: a size limit and a prompt pre-check.

- A body over ``max_bytes`` gets 413: a declared ``Content-Length`` before any of the body is
  read, a chunked body the moment it passes the limit.
- A completions or chat body over :data:`LARGE_BODY_BYTES` is parsed first in a worker process
  (:class:`server.body_scan.BodyScanner`: ``json.loads`` of 10 MB holds the event loop for ~100
  ms, which would stall ``/health``; even in a thread a parse holds the GIL 20-45 ms); a prompt
  whose text cannot fit in ``max_model_len`` tokens is answered 400 from there, anything else
  goes on to the app unchanged.
"""

from __future__ import annotations

from server.errors import APIError, ErrorJSONResponse, error_body

LARGE_BODY_BYTES = 1 << 20
"""Bodies of generation routes larger than this are pre-checked off the event loop (bytes)."""

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class BodyTooLarge(Exception):
    """Raised inside ``receive`` when a streamed body passes the limit."""


class BodySizeLimit:
    """Answer 413 (OpenAI error shape) for bodies over ``max_bytes`` (bytes), and pre-check large
    generation bodies in a worker thread (see the module docstring)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        if size is not None and size > self.max_bytes:
            return await self._refuse(scope, receive, send)
        if size is not None and size > LARGE_BODY_BYTES and scope["path"] in GENERATION_PATHS:
            return await self._precheck(scope, receive, send)
        if size is None and scope["method"] in ("POST", "PUT", "PATCH"):
            return await self._buffer_chunked(scope, receive, send)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _precheck(self, scope, receive, send):
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        state = scope["app"].state
        try:
            chars = await state.body_scanner.prompt_chars(body, scope["path"])
            if chars is not None:
                from server.requests import check_text_length

                check_text_length(chars, state.engine,
                                  "prompt" if scope["path"] == "/v1/completions" else "messages")
        except APIError as exc:
            response = ErrorJSONResponse(error_body(exc.message, exc.type, exc.param), exc.status)
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _buffer_chunked(self, scope, receive, send):
        """A body without ``Content-Length``: read it here, counted, 413 past the limit (the app's
        body parser would turn an error inside ``receive`` into a 400)."""
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = ErrorJSONResponse(
            error_body(f"the request body is larger than {self.max_bytes} bytes "
                       "(--max-request-body-bytes)", "invalid_request_error", code=413), 413,
            headers={"Connection": "close"})
        await response(scope, receive, send)
