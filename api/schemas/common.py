"""Shapes shared by every route group."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

MIN_TEMPERATURE = 1e-3


def _greedy_or_sane(value: float | None) -> float | None:
    """0 is greedy; a positive temperature below MIN_TEMPERATURE (1e-40, any subnormal) makes logits / T
    overflow to inf and the sampler fail, so it is refused here instead of reaching the model."""
    if value is not None and 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"use 0 for greedy decoding or a temperature of at least {MIN_TEMPERATURE}")
    return value


Temperature = Annotated[float, AfterValidator(_greedy_or_sane)]


class StrictModel(BaseModel):
    """Request bodies: unknown fields are errors (a typo must not silently change behaviour), and
    NaN/Infinity are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(type_: str, message: str, param: str | None = None) -> dict:
    """The one error shape as a dict (`param` only when a field is at fault): every HTTP error, SSE
    error frame and RunPod error output is built here."""
    body = {"type": type_, "message": message}
    if param:
        body["param"] = param
    return {"error": body}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Invalid request (the field at fault is in `param`)",
        401: "Missing or wrong secret",
        404: "Unknown trait or vector",
        422: "Request body failed validation",
        503: "Model loading, engine unavailable, or queue full (see Retry-After)",
    }.items()
}
