"""GET /health, /v1/models and /metrics."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from hayate.server.errors import ERROR_RESPONSES
from hayate.server.metrics import CONTENT_TYPE
from hayate.server.responses import Health, ModelCard, ModelList, json_response
from hayate.server.state import ServerState, server_state

router = APIRouter()


@router.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["status"],
            summary="200 when requests can be served; 503 while loading or if the engine stopped")
async def health(state: ServerState = Depends(server_state)) -> JSONResponse:
    reason = state.unavailable_reason()
    name = state.model.name if state.model is not None else None
    if reason is None:
        return JSONResponse(Health(status="ok", model=name).model_dump(), status_code=200)
    status = "loading" if state.model is None and state.load_error is None else "unavailable"
    return JSONResponse(Health(status=status, model=name, detail=reason).model_dump(), status_code=503)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, tags=["models"])
async def list_models(state: ServerState = Depends(server_state)) -> Response:
    state.available_model()
    return json_response(ModelList(data=[_card(state)]))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES, tags=["models"])
async def retrieve_model(model_id: str, state: ServerState = Depends(server_state)) -> Response:
    state.require_model(model_id)
    return json_response(_card(state))


def _card(state: ServerState) -> ModelCard:
    model = state.model
    return ModelCard(id=model.name, created=model.created, context_window=model.max_model_len)


@router.get("/metrics", tags=["status"], summary="Prometheus metrics",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(state: ServerState = Depends(server_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
