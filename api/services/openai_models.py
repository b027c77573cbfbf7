"""Model names on the OpenAI routes: the served model (any of its ids) and every steering preset, which
GET /v1/models lists beside it so OpenAI-compatible tools can pick a steered model by name."""

from __future__ import annotations

from api.schemas.openai import ModelCard, ModelList
from api.services.ports import Serving
from api.services.presets import find_preset
from infrastructure.errors import UnknownModelError
from infrastructure.storage.presets import Preset


def served_model(runtime: Serving, requested: str | None) -> tuple[str, Preset | None]:
    """(the name answers carry, the preset it selects): the served id for the model itself (its weights id is
    accepted too), the preset's name for a preset; anything else is `model_not_found`."""
    loaded = runtime.loaded
    if requested is None or requested in (loaded.model_id, loaded.weights_id):
        return loaded.model_id, None
    preset = find_preset(runtime, requested)
    if preset is not None:
        return preset.name, preset
    raise UnknownModelError(
        f"The model {requested!r} does not exist; this server serves {loaded.model_id!r} and the presets "
        "listed by GET /v1/models",
        "model",
    )


def list_models(runtime: Serving) -> ModelList:
    runtime.require_engine()
    created = int(runtime.started_at)
    cards = [ModelCard(id=runtime.loaded.model_id, created=created)]
    cards += [ModelCard(id=name, created=created, owned_by="preset") for name in sorted(runtime.presets.presets)]
    return ModelList(data=cards)


def model_card(runtime: Serving, model: str) -> ModelCard:
    runtime.require_engine()
    name, preset = served_model(runtime, model)
    return ModelCard(id=name, created=int(runtime.started_at), owned_by="preset" if preset else "persona-serving")
