"""HTTP across a Ray hop: the ingress forwards each request whole to a model replica, which runs
hayate's own app on it in-process and streams the ASGI messages back.

The ingress owns what a replica's death means to a client: a request with nothing answered yet
is retried on another replica; a stream cut after it began ends with an OpenAI-format error
event and `data: [DONE]`, never silently. Plain Python: Ray's errors and handles are passed in."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hayate.server.errors import SERVER_ERROR, error_body, error_response
from hayate.server.streaming import DONE, wait_for_disconnect

log = logging.getLogger("hayate.server")
Headers = list[tuple[bytes, bytes]]
REPLICA_HEADER = b"x-hayate-replica"   # which replica answered: "<Ray replica id>/<pid>"
LOST_CODE = "replica_lost"
HEALTH_PATH = "/health"
HEALTH_WAIT_S = 5.0    # a probe is not queued until a replica comes up: past this, 503


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request, body read, as it crosses to a replica (pickled by Ray)."""
    method: str
    path: str
    query_string: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None
    prefix_key: str | None = None     # read by the prefix router (router.py)

    @classmethod
    def from_scope(cls, scope: Scope, body: bytes) -> "ForwardedRequest":
        client = tuple(scope["client"]) if scope.get("client") else None
        return cls(scope["method"], scope["path"], scope.get("query_string", b""),
                   [(bytes(name), bytes(value)) for name, value in scope.get("headers", [])], body, client)

    def scope(self) -> Scope:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "query_string": self.query_string, "root_path": "", "headers": list(self.headers),
                "client": self.client, "server": None, "state": {}}


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: Headers = field(default_factory=list)

    @property
    def is_event_stream(self) -> bool:
        return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                   for name, value in self.headers)


@dataclass(frozen=True)
class ResponseEnd:
    """The replica's last item: the response is complete. A stream that stops without it was cut."""


class ReplicaLost(Exception):
    """No replica could take the request (every attempt's replica died or was unreachable)."""


async def run_app(app: ASGIApp, request: ForwardedRequest, extra_headers: Headers = ()
                  ) -> AsyncIterator[ResponseStart | bytes | ResponseEnd]:
    """Replica side: run `app` on `request`, yielding the response's start, its body chunks and
    ResponseEnd. Closing the iterator early tells the app the client disconnected (hayate then
    aborts the engine requests)."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    pending_body = [request.body]

    async def receive() -> dict:
        if pending_body:
            return {"type": "http.request", "body": pending_body.pop(), "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(request.scope(), receive, messages.put)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                                    + list(extra_headers))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    yield ResponseEnd()
                    return
        task.result()   # the app raised: let the ingress see it
        raise RuntimeError("the app returned without completing its response")
    finally:
        disconnected.set()
        await asyncio.wait({task}, timeout=5.0)
        task.cancel()


def error_event(message: str, code: str = LOST_CODE) -> bytes:
    """An SSE error event in OpenAI's format (clients raise it as APIError), then [DONE]."""
    body = error_body(message, type=SERVER_ERROR, code=code)
    return f"data: {json.dumps(body)}\n\n{DONE}".encode()


OpenStream = Callable[[ForwardedRequest], AsyncIterator]


class Relay:
    """Ingress side, an ASGI app: each HTTP request goes to a replica through `open_stream`
    (a Ray streaming call). `lost_errors` are the exceptions that mean the replica died or is
    unreachable; `key_of(request)` gives its prefix key, if prefix routing is on."""

    def __init__(self, open_stream: OpenStream, lost_errors: tuple[type[BaseException], ...],
                 key_of: Callable[[ForwardedRequest], str | None] | None = None, attempts: int = 4,
                 backoff_s: float = 0.25):
        self.open_stream, self.lost_errors, self.key_of = open_stream, lost_errors, key_of
        self.attempts, self.backoff_s = attempts, backoff_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        request = ForwardedRequest.from_scope(scope, await _read_body(receive))
        if self.key_of is not None:
            request = replace(request, prefix_key=self.key_of(request))
        relaying = asyncio.create_task(self._relay(request, scope, receive, send))
        watching = asyncio.create_task(wait_for_disconnect(receive))
        try:
            await asyncio.wait({relaying, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relaying, watching):
                task.cancel()
            await asyncio.gather(relaying, watching, return_exceptions=True)

    async def _relay(self, request: ForwardedRequest, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            opening = self._open(request)
            if request.path == HEALTH_PATH:
                opening = asyncio.wait_for(opening, HEALTH_WAIT_S)
            stream, start, first = await opening
        except asyncio.TimeoutError:
            body = {"status": "unavailable", "model": None, "detail": "no replica is ready"}
            return await JSONResponse(body, status_code=503)(scope, receive, send)
        except ReplicaLost as error:
            response = error_response(503, str(error), type=SERVER_ERROR, code="replica_unavailable",
                                      headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        except Exception as error:   # a bug on the replica, before it answered
            log.exception("replica failed before answering %s %s", request.method, request.path)
            response = error_response(500, f"the replica failed: {_one_line(error)}", type=SERVER_ERROR,
                                      code="internal_error")
            return await response(scope, receive, send)
        completed = False
        try:
            completed = await self._forward(stream, start, first, send)
        finally:
            if not completed:   # the client left, or the replica is gone: stop its work
                _cancel(stream)

    async def _open(self, request: ForwardedRequest) -> tuple[AsyncIterator, ResponseStart, bytes | ResponseEnd]:
        """A replica's stream with its response start and first body item; a replica that dies
        before sending them has answered nothing, so the request is sent again (to another)."""
        reason = "no attempt"
        for attempt in range(self.attempts):
            stream = self.open_stream(request)
            try:
                return stream, await anext(stream), await anext(stream)
            except StopAsyncIteration:
                reason = "the replica ended the request without answering"
            except self.lost_errors as error:
                reason = _one_line(error)
            except asyncio.CancelledError:   # the client left, or a health probe's wait ran out
                _cancel(stream)
                raise
            _cancel(stream)
            log.warning("replica lost before answering %s (attempt %d): %s", request.path, attempt + 1, reason)
            await asyncio.sleep(self.backoff_s * (attempt + 1))
        raise ReplicaLost(f"no replica could answer: {reason}")

    async def _forward(self, stream: AsyncIterator, start: ResponseStart, item: bytes | ResponseEnd,
                       send: Send) -> bool:
        """Send the response on; True once it is complete. If the replica is lost mid-way, an
        event stream gets an error event and [DONE] (unless its [DONE] already went); other
        bodies can only stop short."""
        await send({"type": "http.response.start", "status": start.status, "headers": start.headers})
        last = b""
        try:
            while not isinstance(item, ResponseEnd):
                await send({"type": "http.response.body", "body": item, "more_body": True})
                last, item = item, await anext(stream)
            completed = True
        except StopAsyncIteration:
            completed = await self._cut(start, last, "the replica's stream stopped early", send)
        except Exception as error:   # Ray's actor errors, or the replica's app failing mid-answer
            completed = await self._cut(start, last, _one_line(error), send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return completed

    @staticmethod
    async def _cut(start: ResponseStart, last: bytes, reason: str, send: Send) -> bool:
        log.warning("replica lost mid-answer: %s", reason)
        if start.is_event_stream and not last.endswith(DONE.encode()):
            message = f"the replica serving this request stopped mid-answer ({reason}); the answer is incomplete"
            await send({"type": "http.response.body", "body": error_event(message), "more_body": True})
        return False


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    """The relay holds nothing to start or stop; it only acknowledges."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _cancel(stream: AsyncIterator) -> None:
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
