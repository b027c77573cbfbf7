"""Shared plumbing of the persona scripts: load a model once and run an engine around it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.model_loader import LoadedModel, load_model

ALL_TRAITS = ("sexism", "racism", "helpfulness", "sarcasm", "maliciousness", "flattery", "hallucination")


def settings_for(model: str | None) -> Settings:
    """Settings from the environment, with `--model` (weights id or folder) taking precedence."""
    settings = Settings(_env_file=None)
    return settings.model_copy(update={"model_name": model}) if model else settings


@contextmanager
def running_engine(model: str | None = None, max_batch_size: int = 32) -> Iterator[tuple[LoadedModel, PersonaEngine]]:
    """Load the model (the embedded one by default), start an engine, stop it on the way out."""
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(settings_for(model))
    engine = PersonaEngine(loaded, max_batch_size=max_batch_size)
    engine.start()
    if not engine.wait_ready(300):
        raise RuntimeError(f"engine did not start: {engine.broken}")
    try:
        yield loaded, engine
    finally:
        engine.stop()
