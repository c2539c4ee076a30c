"""The two Ray Serve deployments: model replicas, each running hayate's own server app (engine,
templates, validation, metrics) in-process, and a light ingress with no model that relays HTTP
to them through a DeploymentHandle, so a replica's death is seen, and answered, by a process
that survives it."""
from __future__ import annotations

import asyncio
import os
from functools import partial

from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.handle import DeploymentHandle

from hayate.config import EngineConfig
from hayate.scale.prefix import ROUTED_PATHS, prefix_key
from hayate.scale.relay import REPLICA_HEADER, ForwardedRequest, Relay, run_app
from hayate.server import ServerSettings, create_app
from hayate.server.auth import APIKeyMiddleware
from hayate.server.limits import BodyLimitMiddleware
from hayate.server.state import ServerState

# What a call to a replica raises when its process died or cannot be reached.
LOST_ERRORS = (RayActorError, WorkerCrashedError)
LOAD_POLL_S = 0.1


class ModelReplica:
    """One engine. Its constructor returns once the model has loaded (so Ray routes to it only
    then) and raises if loading failed; `check_health` fails once the engine has stopped, and
    Ray then replaces the replica."""

    async def __init__(self, settings: ServerSettings, config: EngineConfig, max_queue: int):
        from hayate.serve import load_model

        self.app = create_app(settings, partial(load_model, config, max_queue))
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        await _until_loaded(self.app.state.hayate)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.headers = [(REPLICA_HEADER, f"{replica_id}/{os.getpid()}".encode())]

    async def forward(self, request: ForwardedRequest):
        """Answer one forwarded HTTP request: its response start, body chunks, then the end mark."""
        async for item in run_app(self.app, request, self.headers):
            yield item

    def check_health(self) -> None:
        reason = self.app.state.hayate.unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)

    async def __del__(self):
        """Ray's graceful shutdown has let in-flight requests finish; stop the engine."""
        await self.lifespan.__aexit__(None, None, None)


async def _until_loaded(state: ServerState) -> None:
    while state.model is None and state.load_error is None:
        await asyncio.sleep(LOAD_POLL_S)
    if state.load_error is not None:
        raise RuntimeError(f"could not load the model: {state.load_error}")


class Ingress:
    """The HTTP entry point: API keys and the body cap checked here, at the edge, then each
    request relayed whole to a model replica (relay.Relay), keyed by its prompt prefix when
    `--routing prefix` is on."""

    def __init__(self, model: DeploymentHandle, settings: ServerSettings, routing: str):
        key_of = _routing_key if routing == "prefix" else None
        self.relay = Relay(partial(_open_stream, model.options(stream=True)), LOST_ERRORS, key_of)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        checked = BodyLimitMiddleware(self.relay, max_bytes=self.settings.max_body_bytes)
        return APIKeyMiddleware(checked, keys=self.settings.api_keys)


def _open_stream(model: DeploymentHandle, request: ForwardedRequest):
    return model.forward.remote(request)


def _routing_key(request: ForwardedRequest) -> str | None:
    return prefix_key(request.body) if request.path in ROUTED_PATHS else None
