"""Helpers for app-level tests: extra apps with their own settings around the one session engine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI

from app.factory import create_app
from app.runtime import Runtime
from app.settings import Settings


@pytest.fixture(scope="session")
def make_app(loaded_model, engine) -> Callable[..., FastAPI]:
    """create_app(settings) for settings overrides, sharing the session engine (never stopping it)."""

    def build(**overrides) -> FastAPI:
        settings = Settings(_env_file=None, **overrides)
        runtime = Runtime(settings, owns_engine=False)
        runtime.attach(loaded_model, engine)
        return create_app(settings, runtime=runtime)

    return build
