"""Session fixtures: the real embedded model is loaded once and one engine serves every test."""

from __future__ import annotations

import pytest

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.model_loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(_env_file=None)


@pytest.fixture(scope="session")
def loaded_model(settings: Settings) -> LoadedModel:
    return load_model(settings)


@pytest.fixture(scope="session")
def engine(loaded_model: LoadedModel):
    engine = PersonaEngine(loaded_model, max_batch_size=16)
    engine.start()
    assert engine.wait_ready(120), engine.broken
    yield engine
    engine.stop()
