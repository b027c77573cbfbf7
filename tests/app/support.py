"""Helpers for app-level tests (clients for extra apps, the one error shape, polling)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from tests.helpers import (
    client_for,  # noqa: F401  (re-exported for the app tests)
    error_of,
)

GREEDY_PROBE = {"prompt": "Name a colour.", "max_tokens": 4, "temperature": 0}


def assert_error_shape(response: httpx.Response, status: int, type_: str | None = None) -> dict:
    """The one error shape, with this status (and type); returns the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    error = error_of(response.request.url.path, body)
    assert set(error) <= {"type", "message", "param"} and error["type"] and error["message"], body
    if type_ is not None:
        assert error["type"] == type_, body
    return error


async def settles(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll a condition the inference thread makes true shortly after an event is delivered."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()
