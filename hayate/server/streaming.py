"""Server-sent events, and noticing a client that hangs up (streaming or not) so its
requests are aborted at once instead of running to the end for nobody."""
from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from hayate.server.errors import APIError, ClientDisconnected, error_body

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the body has been read, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client hangs up first, cancel it and raise ClientDisconnected."""
    working = asyncio.ensure_future(work)
    watching = asyncio.create_task(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        working.cancel()   # no-op once done
    if working in done:
        return working.result()
    await asyncio.gather(working, return_exceptions=True)
    raise ClientDisconnected()


async def respond(request: Request, run, stream: bool, chunks: Callable[[], AsyncIterator[BaseModel | str]],
                  whole: Callable[[], Response]) -> Response:
    """The answer to one API request whose engine requests `run` (a ChoiceRun) has queued:
    an SSE stream of `chunks()`, or `whole()` once every choice is done. Either way the
    engine requests are aborted if the client leaves first."""
    if stream:
        return EventStream(sse(chunks()), on_close=run.abort)
    try:
        await until_disconnected(request, run.collect())
    finally:
        run.abort()
    return whole()


async def sse(chunks: AsyncIterator[BaseModel | str]) -> AsyncIterator[str]:
    """`data: {json}` per chunk (a str is a chunk's JSON already written), then `data: [DONE]`;
    an error mid-stream becomes an error event (the status line has already gone), which
    OpenAI clients raise as APIError."""
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield f"data: {chunk if isinstance(chunk, str) else chunk.model_dump_json()}\n\n"
        except APIError as error:
            body = error_body(error.message, type=error.type, param=error.param, code=error.code)
            yield f"data: {json.dumps(body)}\n\n"
            return
    yield DONE


class EventStream(StreamingResponse):
    """text/event-stream that stops as soon as the client disconnects, whatever the ASGI
    server's spec version, and then calls `on_close` (which aborts the engine requests)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.create_task(self._send_all(send))
        watching = asyncio.create_task(wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sending.cancel()
            watching.cancel()
            await asyncio.gather(sending, watching, return_exceptions=True)
            self.on_close()
        if sending in done:
            sending.result()   # re-raise a bug rather than hide it

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async with aclosing(self.events):
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
