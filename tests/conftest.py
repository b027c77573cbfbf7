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
def runtime(settings: Settings, loaded_model: LoadedModel, engine: PersonaEngine):
    """The app's runtime around the session engine (the app does not own or stop it)."""
    from app.runtime import Runtime

    rt = Runtime(settings, owns_engine=False)
    rt.attach(loaded_model, engine)
    return rt


@pytest.fixture(scope="session")
def app(runtime):
    from app.factory import create_app

    return create_app(runtime=runtime)


@pytest.fixture
async def client(app):
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
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
