"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}} with the right status.

Whatever a client sends, it gets one of these bodies, never a traceback and never FastAPI's
own 422 shape (OpenAI clients read only this format)."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hayate.server.responses import ErrorResponse

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RETRY_AFTER_S = 1     # what 429 and 503 answers suggest: the queue moves every step
_CODE_BY_STATUS = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                   413: "request_too_large", 429: "rate_limit_exceeded", 503: "service_unavailable"}

# For the OpenAPI page: what the API routes may answer besides 200.
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": description} for status, description in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "body too large"), (429, "queue full; retry after Retry-After seconds"),
    (503, "model loading or engine stopped"))}


class APIError(Exception):
    """An error to send to the client as is (status, message, and OpenAI's type/param/code)."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param,
                              code=self.code, headers=self.headers)


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody reads the response."""


def error_body(message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str = INVALID_REQUEST,
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type=type, param=param, code=code),
                        status_code=status, headers=headers)


def param_path(location: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content' (OpenAI's `param`)."""
    path = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def validation_message(error: dict) -> tuple[str, str | None]:
    """One line for the first problem pydantic found, and the parameter it concerns."""
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "invalid JSON")
        return f"the request body is not valid JSON: {detail}", None
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    param = param_path(tuple(error.get("loc", ())))
    if param is None and error.get("type") == "missing":
        return "the request body is missing; send a JSON object", None
    if param is None:
        return "the request body must be a JSON object, sent as Content-Type: application/json", None
    return f"{param}: {message}", param


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error.response()


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    message, param = validation_message(error.errors()[0])
    return error_response(400, message, param=param, code="invalid_value" if param else "invalid_body")


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = error.detail if isinstance(error.detail, str) else "request failed"
    if error.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif error.status_code == 405:
        message = f"{request.url.path} does not accept {request.method}"
    error_type = SERVER_ERROR if error.status_code >= 500 else INVALID_REQUEST
    return error_response(error.status_code, message, type=error_type,
                          code=_CODE_BY_STATUS.get(error.status_code), headers=error.headers)


async def _client_disconnected(request: Request, error: ClientDisconnected) -> JSONResponse:
    return error_response(499, "client closed the request")   # never read; keeps logs honest


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    # A bug, not the client's doing: Starlette re-raises it after this, so the log has the traceback.
    return error_response(500, "internal server error; see the server log", type=SERVER_ERROR,
                          code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, _client_disconnected)
    app.add_exception_handler(Exception, _unexpected)
