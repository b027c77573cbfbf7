"""Helpers for app-level tests: extra apps with their own settings around the one session engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from app.factory import create_app
from app.runtime import Runtime
from app.settings import Settings

GREEDY_PROBE = {"prompt": "Name a colour.", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="session")
def make_app(loaded_model, engine) -> Callable[..., FastAPI]:
    """create_app(settings) for settings overrides, sharing the session engine (never stopping it)."""

    def build(**overrides) -> FastAPI:
        settings = Settings(_env_file=None, **overrides)
        runtime = Runtime(settings, owns_engine=False)
        runtime.attach(loaded_model, engine)
        return create_app(settings, runtime=runtime)

    return build


@asynccontextmanager
async def client_for(app: FastAPI, **kwargs) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120, **kwargs) as c:
        yield c


def assert_error_shape(response: httpx.Response, status: int, type_: str | None = None) -> dict:
    """The one error shape, with this status (and type); returns the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"type", "message", "param"} and error["type"] and error["message"], body
    if type_ is not None:
        assert error["type"] == type_, body
    return error
