"""The one error table: every domain error, validation error and HTTP error becomes
`{"error": {"type", "message", "param"}}` with the status below (on Neuronpedia's and RunPod's routes,
`flat_errors`, the same three as `{"error": "<message>", "type", "param"}`). Unknown errors are logged and
answered with a generic 500 (no traceback leaves the server)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas.common import error_body  # the one shape, built in one place (also re-exported here)
from infrastructure.errors import (
    EngineUnavailableError,
    GenerationError,
    ModelLoadError,
    PersonaDataError,
    PersonaError,
    QueueFullError,
    ReadOnlyTraitError,
    RegistryFullError,
    RequestTimeoutError,
    UnknownModelError,
    UnknownTraitError,
    UnknownVectorError,
    VectorExistsError,
)

log = logging.getLogger(__name__)

# checked in order: the first matching class decides (subclasses before their bases)
STATUS: list[tuple[type[PersonaError], int]] = [
    (UnknownTraitError, 404),
    (UnknownVectorError, 404),
    (UnknownModelError, 404),
    (VectorExistsError, 409),
    (ReadOnlyTraitError, 403),
    (RegistryFullError, 409),
    (QueueFullError, 503),
    (EngineUnavailableError, 503),
    (RequestTimeoutError, 504),
    (GenerationError, 500),
    (ModelLoadError, 500),
    (PersonaDataError, 500),
    (PersonaError, 400),
]

HTTP_TYPES = {
    400: "invalid_request_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
}


def flat_error_body(type_: str, message: str, param: str | None = None) -> dict:
    """Neuronpedia's error shape: the message as the `error` string (where its webapp reads it), the rest beside."""
    body = {"error": message, "type": type_}
    if param:
        body["param"] = param
    return body


def flat_errors(path: str) -> bool:
    """The routes answering errors in Neuronpedia's flat shape: its steering routes, RunPod's envelope and
    load-balancing path, and the RunPod queue API (the one deliberate difference from every other route)."""
    return path.startswith(("/v1/steer/", "/v2/")) or path in ("/runsync", "/generate")


def error_body_for(path: str, type_: str, message: str, param: str | None = None) -> dict:
    """The error body a route answers with (middleware rejections included)."""
    return (flat_error_body if flat_errors(path) else error_body)(type_, message, param)


def status_of(exc: PersonaError) -> int:
    return next(status for cls, status in STATUS if isinstance(exc, cls))


def error_response(exc: PersonaError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
    return JSONResponse(error_body(exc.type, exc.message, exc.param), status_code=status_of(exc), headers=headers)


_UNION_TAGS = frozenset({"str", "int", "float", "bool"})  # pydantic names the union member tried in `loc`


def _field(loc: tuple) -> str | None:
    """The request path of a validation error, without pydantic's union-member tags (`stop.list[str].0` ->
    `stop.0`), so `param` is always a field path."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if p not in _UNION_TAGS and "[" not in p]
    return ".".join(parts) or None


async def _persona_error(request: Request, exc: PersonaError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("invalid_json", f"malformed JSON: {first.get('msg')}"), status_code=400)
    param = _field(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return JSONResponse(error_body("validation_error", message, param), status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = HTTP_TYPES.get(exc.status_code, "http_error")
    param = "body" if exc.status_code == 413 else None  # the only 413 is the body-size limit
    return JSONResponse(error_body(type_, str(exc.detail), param), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


async def answer_error(request: Request, exc: Exception) -> JSONResponse:
    """The answer `install_error_handlers` gives to `exc` (for routes that reshape it, e.g. Neuronpedia's)."""
    if isinstance(exc, PersonaError):
        return await _persona_error(request, exc)
    if isinstance(exc, RequestValidationError):
        return await _validation_error(request, exc)
    if isinstance(exc, StarletteHTTPException):
        return await _http_error(request, exc)
    return await _unexpected(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PersonaError, _persona_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
