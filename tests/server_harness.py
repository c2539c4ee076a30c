"""Run a hayate server in a thread on a free loopback port, for tests that talk HTTP to it."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import openai
import uvicorn

from hayate.llm import LLM
from hayate.server import ServedModel, ServerSettings, create_app
from hayate.server.lifecycle import Server


class ServerThread:
    """uvicorn serving `app` from a background thread; `stop()` shuts it down gracefully."""

    def __init__(self, app, shutdown_timeout: float = 5.0):
        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
        self.server = Server(config, app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state.hayate

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.started and httpx.get(f"{self.url}/health").status_code == 200:
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the server did not become healthy in {timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def tiny_server(folder: Path, *, max_batch: int = 16, max_queue: int = 64, step_delay: float = 0.0,
                settings: ServerSettings | None = None, shutdown_timeout: float = 5.0,
                prepare: Callable[[LLM], None] | None = None) -> ServerThread:
    """A started server for the tiny model saved in `folder`; `step_delay` seconds are added to
    every engine step, so requests last long enough to be caught queued or mid-stream;
    `prepare` may change the loaded LLM (inject a fault) before it serves."""
    def load() -> ServedModel:
        llm = LLM(str(folder), max_num_seqs=max_batch)
        if step_delay:
            llm.engine.step = _slowed(llm.engine.step, step_delay)
        if prepare is not None:
            prepare(llm)
        return ServedModel.from_llm(llm, max_queue)

    return ServerThread(create_app(settings or ServerSettings(), load), shutdown_timeout).start()


def wait_until(condition, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def _slowed(step, delay: float):
    def slow_step():
        time.sleep(delay)
        return step()
    return slow_step


def openai_client(server: ServerThread) -> openai.OpenAI:
    """The official client against a test server (no retries: a failure shows at once)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
