"""The playground: a chat page at / for trying the served model in a browser, shipped in the
package as plain HTML, JavaScript and CSS (hayate/server/static: no build step, nothing from a
CDN, so it works offline).

The page and its assets hold no data, so they are served ahead of the API-key check, as /health
is; what the page fetches (/playground/config, /v1/chat/completions, /metrics) stays behind it.
Every asset goes out under a Content-Security-Policy of this origin only (images may also be
the data: URLs of pictures the user attaches), and model text only ever reaches the page as
text (textContent)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from hayate.server.errors import ERROR_RESPONSES
from hayate.server.responses import json_response
from hayate.server.state import ServerState, server_state

ASSETS = {   # path -> (file in hayate/server/static, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/playground/api.js": ("api.js", "text/javascript; charset=utf-8"),
    "/playground/panes.js": ("panes.js", "text/javascript; charset=utf-8"),
    "/playground/stats.js": ("stats.js", "text/javascript; charset=utf-8"),
    "/playground/style.css": ("style.css", "text/css; charset=utf-8"),
}
AUTH_PATH = "/playground/auth.json"   # whether to ask for a key before the first call (no 401 in the console)
# Trusted Types: the browser itself refuses any string assigned as HTML (innerHTML and kin).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'; "
                           "trusted-types 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str


def load_assets(key_required: bool) -> dict[str, Asset]:
    """The page's files, read once from the package, and the auth note, by path."""
    static = resources.files("hayate.server") / "static"
    assets = {path: Asset((static / name).read_bytes(), media_type) for path, (name, media_type) in ASSETS.items()}
    assets[AUTH_PATH] = Asset(json.dumps({"key_required": key_required}).encode(), "application/json")
    return assets


class PlaygroundMiddleware:
    """Outermost layer: GET (or HEAD) of a playground asset is answered here, before the key check."""

    def __init__(self, app: ASGIApp, key_required: bool):
        self.app, self.assets = app, load_assets(key_required)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asset = self.assets.get(scope["path"]) if scope["type"] == "http" else None
        if asset is None or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        response = Response(asset.body, media_type=asset.media_type, headers=SECURITY_HEADERS)
        await response(scope, receive, send)


class PlaygroundConfig(BaseModel):
    """What the page adapts to: the model, and whether and how many images it takes."""
    model: str
    context_window: int = Field(description="tokens, prompt and answer together")
    accepts_images: bool = Field(description="a vision model: the page offers image attach, paste and drop")
    max_images: int = Field(description="images per request")
    max_image_bytes: int = Field(description="bytes per image")


router = APIRouter()


@router.get("/playground/config", response_model=PlaygroundConfig, responses=ERROR_RESPONSES, tags=["playground"],
            summary="The served model as the playground page needs it")
async def playground_config(state: ServerState = Depends(server_state)) -> Response:
    model, limits = state.available_model(), state.settings.media.limits
    return json_response(PlaygroundConfig(
        model=model.name, context_window=model.max_model_len, accepts_images=model.processor is not None,
        max_images=limits.max_images, max_image_bytes=limits.max_bytes))
