"""Neuronpedia's wire on the way out: the caller's casing, and errors where its parsers read them.

The current webapp reads camelCase (`outputs[].chatTemplate`, `assistantAxis`, `pcValues`,
`logprobs[].topLogprobs`); seed 000 and the previous webapp read snake_case. Errors on these routes are
`{"error": "<message>", "type": ..., "param": ...}`: both webapps show the `error` string, where the
other routes' `{"error": {"type", "message", "param"}}` would reach their user as a bare status text.
A failure mid-stream is a frame that still carries `outputs` (the text so far), because the current
parser looks the output up in every frame and throws on one without."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from app.errors import flat_error_body

CAMEL_KEYS = {
    "chat_template": "chatTemplate",
    "assistant_axis": "assistantAxis",
    "assistant_axis_unavailable": "assistantAxisUnavailable",
    "pc_titles": "pcTitles",
    "pc_values": "pcValues",
    "pc_values_post_cap": "pcValuesPostCap",
    "top_logprobs": "topLogprobs",
}
DATA_KEYS = {"pc_values", "pc_values_post_cap"}  # their keys are axis titles, not field names


def camelize(obj: Any) -> Any:
    """A snake_case frame in the current webapp's casing (field names only; data is left alone)."""
    if isinstance(obj, dict):
        return {CAMEL_KEYS.get(k, k): (dict(v) if k in DATA_KEYS else camelize(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [camelize(v) for v in obj]
    return obj


def in_casing(frame: dict, camel: bool) -> dict:
    return camelize(frame) if camel else frame


flat_error = flat_error_body  # the error body of these routes: the message as the `error` string, the rest beside


def flat_error_response(response: JSONResponse) -> JSONResponse:
    """One of the app's error answers (`{"error": {...}}`) rewritten in the flat shape, same status and headers."""
    nested = json.loads(response.body)["error"]
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    body = flat_error(nested["type"], nested["message"], nested.get("param"))
    return JSONResponse(body, status_code=response.status_code, headers=headers)


def error_frame(last: dict, type_: str, message: str, param: str | None = None) -> dict:
    """A mid-stream failure: the last frame's outputs (and input) with the flat error beside them."""
    keep = {k: v for k, v in last.items() if k in ("outputs", "input")}
    return keep | flat_error(type_, message, param)
