"""AsyncEngine: the engine loop in its own thread, one asyncio stream of outputs per request.

The loop thread owns the Engine: requests and aborts reach it through a command queue,
outputs go back to the event loop with call_soon_threadsafe, so the event loop never waits
on a model step."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, TypeVar

from hayate.engine.engine import Engine
from hayate.engine.request import EngineStats, RequestFailedError, RequestOutput
from hayate.multimodal.features import PromptImages
from hayate.sampling import SamplingParams

log = logging.getLogger("hayate.engine")
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an unexpected error; no request can be served."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    images: PromptImages | None
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


@dataclass
class _EndAll:
    reason: BaseException


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Add] = {}     # owned by the loop thread
        self._pending_adds = 0                   # requests queued but not yet in the engine
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hayate-engine", daemon=True)
        self._thread.start()

    @classmethod
    def start_with(cls, build: Callable[[], T], engine_of: Callable[[T], Engine],
                   max_queue: int = 256) -> tuple[T, "AsyncEngine"]:
        """Run build() (loading the model) on the engine thread itself, then the loop there.
        One thread both loads and steps the model, so the process holds one OpenMP thread
        team: a second team (one per thread that ran PyTorch operators) makes libgomp
        throttle its spinning, and prefill runs about 2x slower. Errors of build() raise here."""
        built: list = []
        ready = threading.Event()

        def main() -> None:
            try:
                value = build()
                engine = cls(engine_of(value), max_queue)
                engine._thread = threading.current_thread()
                built.append((value, engine))
            except BaseException as error:   # handed to the waiting caller
                built.append(error)
                return
            finally:
                ready.set()
            engine._run()

        threading.Thread(target=main, name="hayate-engine", daemon=True).start()
        ready.wait()
        if isinstance(built[0], BaseException):
            raise built[0]
        return built[0]

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is in flight, stop the loop thread and wait for it."""
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ---- requests ----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams,
                 images: PromptImages | None = None) -> None:
        """Raise ValueError if the request can never run (safe from any thread)."""
        self.engine.validate_request(prompt_token_ids, params, images)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       images: PromptImages | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine makes them. Leaving the iteration early
        (client gone, task cancelled) aborts the request and frees its KV space."""
        outputs = self.submit(request_id, prompt_token_ids, params, images)
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()   # so an early exit reaches _outputs' abort at once

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               images: PromptImages | None = None) -> AsyncIterator[RequestOutput]:
        """Queue the request now (QueueFullError, EngineDeadError and ValueError raise here,
        so a server can still answer with an error status) and return its outputs. The caller
        must iterate them to the end or call abort(): an iterator never started cannot abort."""
        stream = self._submit(request_id, prompt_token_ids, params, images)
        return self._outputs(request_id, stream)

    async def _outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def end_all(self, reason: BaseException) -> None:
        """Abort every request in flight, raising `reason` in each one's outputs (shutdown)."""
        self._commands.put(_EndAll(reason))

    def _submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                images: PromptImages | None) -> asyncio.Queue:
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running ({self.error or 'stopped'})")
        self.validate(prompt_token_ids, params, images)
        with self._lock:
            if self._pending_adds + self.stats().num_waiting >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._pending_adds += 1
        stream: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, images, stream,
                                asyncio.get_running_loop()))
        return stream

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- the loop thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self.engine.check_workers()
                self._apply_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping.is_set():
                    self._deliver(self.engine.step())
        except Exception as error:  # a bug or resource failure: fail every stream, go unhealthy
            log.exception("engine loop failed")
            self.error = error
        finally:
            self._abort_all(self.error or EngineDeadError("the server is shutting down"))
            self.engine.close()

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
                self._streams.pop(command.request_id, None)
            elif isinstance(command, _EndAll):
                self._abort_all(command.reason)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None

    def _add(self, command: _Add) -> None:
        with self._lock:
            self._pending_adds -= 1
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                    command.images)
        except ValueError as error:
            self._send(command, error)
            return
        except Exception as error:   # a fault of this request's, not the loop's
            log.exception("could not add request %s", command.request_id)
            self._send(command, RequestFailedError(f"the engine could not start this request "
                                                   f"({type(error).__name__}: {error})"))
            return
        self._streams[command.request_id] = command

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            target = self._streams.get(output.request_id)
            if target is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            if output.finish_reason == "error":
                self._send(target, RequestFailedError.of(output))
            else:
                self._send(target, output)

    def _send(self, target: _Add, item: RequestOutput | BaseException) -> None:
        """Hand an item to the requester's event loop; if that loop is gone, drop the request
        rather than the engine."""
        try:
            target.loop.call_soon_threadsafe(target.stream.put_nowait, item)
        except RuntimeError:  # the loop was closed
            self.engine.abort_request(target.request_id)
            self._streams.pop(target.request_id, None)

    def _abort_all(self, reason: BaseException) -> None:
        for request_id, target in list(self._streams.items()):
            self.engine.abort_request(request_id)
            self._send(target, reason)
        self._streams.clear()
