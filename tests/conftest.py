"""Session fixtures: the real embedded model is loaded once and one engine serves every test."""

from __future__ import annotations

import pytest

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.model_loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(_env_file=None)


_SESSION_MODELS: list = []


@pytest.fixture(scope="session")
def loaded_model(settings: Settings) -> LoadedModel:
    loaded = load_model(settings)
    _SESSION_MODELS.append(loaded.model)
    return loaded


@pytest.fixture(autouse=True)
def _no_hook_outlives_a_test(request):
    """Hooks never leak: after every test the session model carries no hook of ours."""
    from infrastructure.steering.hooks import our_hooks

    yield
    for model in _SESSION_MODELS:
        left = our_hooks(model)
        assert not left, f"{request.node.nodeid} left steering hooks on {left}"


@pytest.fixture(scope="session")
def engine(loaded_model: LoadedModel):
    engine = PersonaEngine(loaded_model, max_batch_size=16)
    engine.start()
    assert engine.wait_ready(120), engine.broken
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def make_runtime(loaded_model: LoadedModel, engine: PersonaEngine):
    """A runtime around the session model with settings overrides (`secret`, `vectors_dir`, ...) and the
    session engine, or `engine=` another one; the app never owns or stops it. The one place tests attach."""
    from app.runtime import Runtime

    def build(engine_override: PersonaEngine | None = None, **overrides):
        rt = Runtime(Settings(_env_file=None, **overrides), owns_engine=False)
        rt.attach(loaded_model, engine_override or engine)
        return rt

    return build


@pytest.fixture(scope="session")
def runtime(make_runtime):
    """The app's runtime around the session engine."""
    return make_runtime()


@pytest.fixture(scope="session")
def app(runtime):
    from app.factory import create_app

    return create_app(runtime=runtime)


@pytest.fixture
async def client(app):
    from tests.helpers import client_for

    async with client_for(app) as c:
        yield c


def pytest_collection_modifyitems(config, items):
    """Markers from what a test needs: `slow` on every test that uses the real model (so
    `pytest -m 'not slow'` is the seconds-long part), and `gpu` tests skipped without CUDA."""
    import torch

    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "loaded_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_cuda)
