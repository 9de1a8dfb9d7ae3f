"""An ASGI middleware that refuses request bodies over a size limit with 413, without reading them.

A declared ``Content-Length`` over the limit is answered before any of the body is read; a
chunked body is counted as it arrives and refused the moment it passes the limit.
"""

from __future__ import annotations

from server.errors import ErrorJSONResponse, error_body


class BodyTooLarge(Exception):
    """Raised inside ``receive`` when a streamed body passes the limit."""


class BodySizeLimit:
    """Answer 413 (OpenAI error shape) for bodies over ``max_bytes`` (bytes)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
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

    async def _refuse(self, scope, receive, send):
        response = ErrorJSONResponse(
            error_body(f"the request body is larger than {self.max_bytes} bytes "
                       "(--max-request-body-bytes)", "invalid_request_error", code=413), 413,
            headers={"Connection": "close"})
        await response(scope, receive, send)
