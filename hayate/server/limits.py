"""A cap on request bodies (413), checked from Content-Length and again while reading, since a
chunked upload declares no length; and text checked at the edge: a body that is not valid
UTF-8, or a JSON string holding an unpaired UTF-16 surrogate (which no tokenizer can encode),
is a 400 naming the parameter."""
from __future__ import annotations

import asyncio
import json
import re
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hayate.server.errors import error_response

DRAIN_FACTOR = 8       # read and drop up to this many times the cap, so the client sees the 413,
DRAIN_SECONDS = 0.5    # but no longer than this: a huge or slow upload is cut off
# A backslash-u escape of a UTF-16 surrogate: a cheap first look (a bare pattern, fast on 30 MB), after
# which parsing tells a lone surrogate from a pair or an escaped backslash.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Parsing costs up to ~1 us per JSON value: 32 MB of `[],[],...` would take 4 s. Commas and
# brackets (counted in strings too) bound the values; real requests hold far fewer.
MAX_JSON_VALUES = 500_000


class BodyLimitMiddleware:
    """Reads the whole body (at most `max_bytes`) and checks its text before the app runs, then
    replays it; later receive() calls go to the client, so disconnects are still seen."""

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
                await self._drain(receive, min(int(declared), DRAIN_FACTOR * self.max_bytes))
            return await self._too_large(scope, receive, send)
        body, complete = await self._read(receive)
        if not complete:
            await self._drain(receive, DRAIN_FACTOR * self.max_bytes)
            return await self._too_large(scope, receive, send)
        problem = body_problem(body)
        if problem is not None:
            response = error_response(400, problem[0], param=problem[1], code=problem[2])
            return await response(scope, receive, send)
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
        drained, deadline = 0, time.monotonic() + DRAIN_SECONDS
        while drained <= limit and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            drained += len(message.get("body", b""))

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        megabytes = self.max_bytes / (1024 * 1024)
        response = error_response(413, f"the request body is larger than {megabytes:g} MB",
                                  code="request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)


def body_problem(body: bytes) -> tuple[str, str | None, str] | None:
    """(message, param, code) for a body refused before it is parsed, or None."""
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > MAX_JSON_VALUES:
        return (f"the request body holds about {values} JSON values, more than the {MAX_JSON_VALUES} "
                f"any request needs", None, "request_too_complex")
    problem = text_problem(body)
    return None if problem is None else (*problem, "invalid_unicode")


def text_problem(body: bytes) -> tuple[str, str | None] | None:
    """Why the body's text is not valid Unicode, and the parameter it is in; None if it is."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the request body is not valid UTF-8 (byte {error.start} cannot be decoded)", None
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None   # not JSON: the app says so
    param = _unpaired_surrogate(value)
    if param is None:
        return None
    return f"{param or 'the request body'}: the text holds an unpaired UTF-16 surrogate, which is not valid Unicode", param or None


def _unpaired_surrogate(value: object) -> str | None:
    """The path (OpenAI's `param` style; "" for the body itself) of the first string, or the
    object holding the first key, that is not valid Unicode."""
    pending: list[tuple[str, object]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else str(key)
                if not _encodable(key):
                    return path
                pending.append((child_path, child))
        elif isinstance(item, list):
            pending.extend((f"{path}[{index}]", child) for index, child in enumerate(item))
        elif isinstance(item, str) and not _encodable(item):
            return path
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
