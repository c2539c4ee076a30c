"""create_app: the FastAPI app around a model that loads in the background (GET /health says
503 until it is ready), with OpenAI-format errors, API keys and a body-size cap."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial
from typing import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from hayate.server import chat, completions, status
from hayate.server.auth import APIKeyMiddleware
from hayate.server.errors import install_error_handlers
from hayate.server.limits import BodyLimitMiddleware
from hayate.server.state import ServedModel, ServerSettings, ServerState

log = logging.getLogger("hayate.server")
Loader = Callable[[], ServedModel]


def create_app(settings: ServerSettings, load: Loader,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """`load` runs in a worker thread at start-up; `on_load_error` hears why it failed."""
    state = ServerState.create(settings)
    app = FastAPI(title="hayate", summary="OpenAI / GroqCloud-compatible API for open models",
                  lifespan=_lifespan(state, load, on_load_error))
    app.state.hayate = state
    install_error_handlers(app)
    for module in (chat, completions, status):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)   # added last, so it runs first
    app.openapi = partial(_openapi_without_422, app)
    return app


def _openapi_without_422(app: FastAPI) -> dict:
    """FastAPI documents a 422 for every body; this API answers 400 (see errors.py) instead."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _lifespan(state: ServerState, load: Loader, on_load_error: Callable[[str], None] | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load(state, load, on_load_error))
        try:
            yield
        finally:
            loading.cancel()
            if state.model is not None:   # aborts whatever is still in flight
                await asyncio.to_thread(state.model.engine.shutdown)
    return lifespan


async def _load(state: ServerState, load: Loader, on_load_error: Callable[[str], None] | None) -> None:
    try:
        state.model = await asyncio.to_thread(load)
    except (ValueError, OSError) as error:   # a bad model file or setting: one line, no traceback
        state.load_error = str(error)
        log.error("could not load the model: %s", error)
    except Exception as error:
        state.load_error = f"{type(error).__name__}: {error}"
        log.exception("could not load the model")
    else:
        log.info("serving %s (context %d tokens)", state.model.name, state.model.max_model_len)
        return
    if on_load_error is not None:
        on_load_error(state.load_error)
