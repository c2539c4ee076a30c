"""uvicorn's server, with a graceful shutdown that ends what is still running at its deadline
with an error event or an error status, rather than cutting the connections mid-answer."""
from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI

from hayate.engine.async_engine import EngineDeadError


class Server(uvicorn.Server):
    """On shutdown (SIGTERM), in-flight requests get `timeout_graceful_shutdown` seconds to
    finish; a second before that (at half of it, if it is shorter than two) the engine ends the
    rest, so each stream closes with an error event and each waiting request gets a 503."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timeout = self.config.timeout_graceful_shutdown
        if timeout is None:   # wait as long as the requests take
            return await super().shutdown(sockets)
        deadline = asyncio.get_running_loop().call_later(max(timeout - 1.0, timeout / 2), self._end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _end_requests(self) -> None:
        model = self.app.state.hayate.model
        if model is not None:
            model.engine.end_all(EngineDeadError("the server is shutting down"))
