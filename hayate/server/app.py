"""create_app: the FastAPI app around a model that loads in the background (GET /health says
503 until it is ready), with OpenAI-format errors, API keys, a body-size cap and the
playground at /. Once the model has loaded, the plan's floor on this machine is measured
(before the first request) for /metrics and usage.floor_share."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial
from typing import Callable

import torch
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from hayate.plan.hardware import HardwareProfile
from hayate.server import chat, completions, playground, status
from hayate.server.auth import APIKeyMiddleware
from hayate.server.errors import install_error_handlers
from hayate.server.floor import machine_hardware, measure_floor
from hayate.server.limits import BodyLimitMiddleware
from hayate.server.playground import PlaygroundMiddleware
from hayate.server.state import ServedModel, ServerSettings, ServerState

log = logging.getLogger("hayate.server")
Loader = Callable[[], ServedModel]
Hardware = Callable[[torch.device], HardwareProfile | None]


def create_app(settings: ServerSettings, load: Loader, on_load_error: Callable[[str], None] | None = None,
               hardware: Hardware | None = machine_hardware) -> FastAPI:
    """`load` runs in a worker thread at start-up; `on_load_error` hears why it failed.
    `hardware` profiles the loaded model's device for the floor (None: no floor)."""
    state = ServerState.create(settings)
    app = FastAPI(title="hayate", summary="OpenAI / GroqCloud-compatible API for open models",
                  lifespan=_lifespan(state, load, on_load_error, hardware))
    app.state.hayate = state
    install_error_handlers(app)
    for module in (chat, completions, status, playground):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    # Added last, so it runs first: the page holds no data, so it needs no key (as /health).
    app.add_middleware(PlaygroundMiddleware, key_required=bool(settings.api_keys))
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


def _lifespan(state: ServerState, load: Loader, on_load_error: Callable[[str], None] | None,
              hardware: Hardware | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load(state, load, on_load_error, hardware))
        try:
            yield
        finally:
            loading.cancel()
            if state.model is not None:   # aborts whatever is still in flight
                await asyncio.to_thread(state.model.engine.shutdown)
    return lifespan


async def _load(state: ServerState, load: Loader, on_load_error: Callable[[str], None] | None,
                hardware: Hardware | None) -> None:
    try:
        model = await asyncio.to_thread(load)
    except (ValueError, OSError) as error:   # a bad model file or setting: one line, no traceback
        state.load_error = str(error)
        log.error("could not load the model: %s", error)
    except Exception as error:
        state.load_error = f"{type(error).__name__}: {error}"
        log.exception("could not load the model")
    else:
        if hardware is not None:   # before serving: the CPU probe would share the cores with requests
            await _measure_floor(state, model, hardware)
        state.model = model
        log.info("serving %s (context %d tokens)", model.name, model.max_model_len)
        return
    if on_load_error is not None:
        on_load_error(state.load_error)


async def _measure_floor(state: ServerState, model: ServedModel, hardware: Hardware) -> None:
    """The plan's floor for the loaded model (a second of probing on a CPU), computed off the
    event loop; without it the floor gauges and usage.floor_share stay unset."""
    engine = model.engine.engine
    try:
        profile = await asyncio.to_thread(hardware, engine.runner.device)
        floor = None if profile is None else await asyncio.to_thread(measure_floor, engine, profile)
    except Exception:   # the floor is a report; serving goes on without it
        log.exception("could not measure this machine's floor")
        return
    if floor is not None:
        state.metrics.floor = floor
        log.info("floor on %s: %.0f tokens/s decode at batch 1, %.0f tokens/s prefill", floor.hardware,
                 floor.decode_tokens_per_second(), floor.prefill_tokens_per_second())
