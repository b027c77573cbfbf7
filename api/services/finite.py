"""JSON has no NaN or Infinity: every answer and SSE frame passes through here on its way out.

Python's `json.dumps` writes a bare `NaN` by default (invalid JSON that strict parsers, browsers'
`JSON.parse` among them, reject) and Starlette's JSONResponse raises on it (a 500). Values that can be
non-finite (assistant-axis projections of an overflowing row) are mapped to null at their source with a
flag; this is the net under every other number."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pydantic_core

log = logging.getLogger(__name__)


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (dicts and lists walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Compact JSON, never with NaN / Infinity (non-finite floats become null, and are logged). pydantic-core's
    encoder first (≈ 2 µs for a frame against ≈ 17 µs, and every streamed token of every row is a frame on the
    event loop); anything it writes as NaN / Infinity, or cannot write, goes the standard library's way."""
    try:
        fast = pydantic_core.to_json(value)
        if b"NaN" not in fast and b"Infinity" not in fast:  # (a string holding them also takes the slow way)
            return fast.decode()
    except Exception:  # noqa: BLE001 - e.g. a lone surrogate: the standard library decides, as before
        pass
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        log.warning("non-finite number in an answer: written as null")
        return json.dumps(finite(value), ensure_ascii=False, allow_nan=False)
