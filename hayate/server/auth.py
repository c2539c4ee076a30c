"""API keys: `Authorization: Bearer KEY` on every route but /health, compared in constant time."""
from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from hayate.server.errors import error_response

OPEN_PATHS = frozenset({"/health"})   # load balancers probe it without credentials


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    """Whether `token` is one of `keys`; every key is compared, so timing tells nothing."""
    presented = token.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    return matched


def bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class APIKeyMiddleware:
    """Outermost layer: a request without a valid key is answered 401 before its body is read."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        token = bearer_token(Headers(scope=scope))
        if token is not None and key_matches(token, self.keys):
            return await self.app(scope, receive, send)
        message = ("missing API key: send it as 'Authorization: Bearer KEY'" if token is None
                   else "incorrect API key provided")
        response = error_response(401, message, code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
