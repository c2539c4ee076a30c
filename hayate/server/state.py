"""What the server holds: its settings, the model it serves once loaded, and its metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from hayate.engine.async_engine import AsyncEngine
from hayate.engine.request import EngineStats
from hayate.loading.chat_template import ChatTemplate
from hayate.multimodal.media import MediaPolicy
from hayate.multimodal.processor import ImageProcessor
from hayate.server.errors import RETRY_AFTER_S, SERVER_ERROR, APIError
from hayate.server.metrics import ServerMetrics
from hayate.tools.formats import ToolSetup, tool_setup

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()           # empty: no authentication
    max_n: int = 8                           # most choices per request
    max_body_bytes: int = 32 * MiB           # room for one 20 MB image sent as base64
    media: MediaPolicy = field(default_factory=MediaPolicy)   # where images may come from, limits

    def __post_init__(self) -> None:
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")
        if self.max_n < 1:
            raise ValueError(f"max-n must be >= 1, got {self.max_n}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")


@dataclass
class ServedModel:
    """A loaded model behind a running AsyncEngine, under the name clients use."""
    name: str
    engine: AsyncEngine
    chat_template: ChatTemplate
    processor: ImageProcessor | None = None     # set for vision models
    tool_setup: ToolSetup | None = None         # None: the format the chat template uses
    created: int = field(default_factory=lambda: int(time.time()))
    max_prompt_chars: int = field(init=False)   # longer prompt text cannot fit the context

    def __post_init__(self) -> None:
        self.max_prompt_chars = prompt_char_limit(self.engine.tokenizer, self.engine.max_model_len)
        if self.tool_setup is None:
            self.tool_setup = tool_setup("auto", self.chat_template.source, self.engine.tokenizer)

    @classmethod
    def load(cls, build_llm, max_queue: int) -> "ServedModel":
        """Load a hayate.llm.LLM with build_llm() on the engine's own thread, with its grammar
        backend (0.3-3 s: the tokenizer read by llguidance and xgrammar, which no first JSON
        request should wait for), then serve it."""
        def build():
            llm = build_llm()
            llm.engine.grammars   # the property builds the backend
            return llm
        llm, engine = AsyncEngine.start_with(build, lambda llm: llm.engine, max_queue=max_queue)
        return cls(model_name(llm.model_path), engine, llm.chat_template, llm.processor, llm.tool_setup)

    @classmethod
    def from_llm(cls, llm, max_queue: int) -> "ServedModel":
        """Serve a loaded hayate.llm.LLM: start an AsyncEngine loop around its engine."""
        engine = AsyncEngine(llm.engine, max_queue=max_queue)
        engine.start()
        return cls(model_name(llm.model_path), engine, llm.chat_template, llm.processor, llm.tool_setup)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


def prompt_char_limit(tokenizer, max_model_len: int) -> int:
    """Characters past which a prompt cannot fit the context: a token spans at most the text of
    the longest one, and Unicode normalisation folds at most two characters into one."""
    longest = max(map(len, tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)
    return 2 * max(longest, 1) * max_model_len


def model_name(path: Path) -> str:
    """The id clients use: the file or folder name, without `.gguf`."""
    return path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: ServerMetrics
    model: ServedModel | None = None
    load_error: str | None = None

    @classmethod
    def create(cls, settings: ServerSettings) -> "ServerState":
        state = cls(settings, ServerMetrics())
        state.metrics.watch(state.engine_stats)
        return state

    def engine_stats(self) -> EngineStats | None:
        return self.model.engine.stats() if self.model is not None else None

    def unavailable_reason(self) -> str | None:
        """Why requests cannot be served now, or None when they can."""
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.model is None:
            return "the model is still loading"
        if not self.model.engine.is_alive:
            return f"the engine stopped: {self.model.engine.error or 'shutting down'}"
        return None

    def available_model(self) -> ServedModel:
        """The served model; 503 while it loads or if its engine stopped."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise APIError(503, reason, type=SERVER_ERROR, code="model_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.model

    def require_model(self, name: str) -> ServedModel:
        """The served model if `name` is it; 503 while unavailable, 404 for another name."""
        if name != self.available_model().name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model.name!r} (see GET /v1/models)",
                           param="model", code="model_not_found")
        return self.model


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app handling this request."""
    return request.app.state.hayate
