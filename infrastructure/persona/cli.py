"""Shared plumbing of the persona scripts: load a model once and run an engine around it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from infrastructure.engine.engine import PersonaEngine
from infrastructure.model_loader import LoadConfig, LoadedModel, load_model

ALL_TRAITS = ("sexism", "racism", "helpfulness", "sarcasm", "maliciousness", "flattery", "hallucination")


@contextmanager
def running_engine(config: LoadConfig, max_batch_size: int = 32) -> Iterator[tuple[LoadedModel, PersonaEngine]]:
    """Load the configured model, start an engine, stop it on the way out."""
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(config)
    engine = PersonaEngine(loaded, max_batch_size=max_batch_size)
    engine.start()
    if not engine.wait_ready(300):
        raise RuntimeError(f"engine did not start: {engine.broken}")
    try:
        yield loaded, engine
    finally:
        engine.stop()
