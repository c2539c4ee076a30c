"""A cap on request bodies (413), checked from Content-Length and again while reading, since a
chunked upload declares no length."""
from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hayate.server.errors import error_response

DRAIN_FACTOR = 8   # read and drop up to this many times the cap, so the client sees the 413


class BodyLimitMiddleware:
    """Reads the whole body (at most `max_bytes`) before the app runs, then replays it; later
    receive() calls go to the client, so disconnects are still seen."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # With Expect: 100-continue nothing was sent yet; otherwise drain what is in flight.
            if headers.get("expect", "").lower() != "100-continue":
                await self._drain(receive, int(declared))
            return await self._too_large(scope, receive, send)
        body, complete = await self._read(receive)
        if not complete:
            await self._drain(receive, DRAIN_FACTOR * self.max_bytes)
            return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes, bool]:
        """The body, and False if it outgrew the cap (then only part of it was read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), True   # disconnected: the app will see it too
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return b"", False
            if not message.get("more_body", False):
                return b"".join(chunks), True

    @staticmethod
    async def _drain(receive: Receive, limit: int) -> None:
        """Read and drop the rest of the body: a server that closes while the client is still
        sending makes most clients report a broken pipe instead of the 413."""
        drained = 0
        while drained <= limit:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            drained += len(message.get("body", b""))

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        megabytes = self.max_bytes / (1024 * 1024)
        response = error_response(413, f"the request body is larger than {megabytes:g} MB",
                                  code="request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
