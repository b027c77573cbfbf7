"""Helpers for app-level tests: extra apps with their own settings around the one session engine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI

from app.factory import create_app


@pytest.fixture(scope="session")
def make_app(make_runtime) -> Callable[..., FastAPI]:
    """create_app(settings) for settings overrides, sharing the session engine (never stopping it)."""

    def build(**overrides) -> FastAPI:
        runtime = make_runtime(**overrides)
        return create_app(runtime.settings, runtime=runtime)

    return build
