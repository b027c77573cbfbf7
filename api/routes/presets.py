"""POST/GET/DELETE /api/v1/presets: steering presets, selectable as `model` names on the OpenAI routes."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import RuntimeDep
from api.routing import JSONRoute
from api.schemas.common import ERROR_RESPONSES
from api.schemas.presets import PresetCreateRequest, PresetDeleted, PresetList, PresetOut
from api.services.presets import create_preset, delete_preset, list_presets, show_preset

router = APIRouter(route_class=JSONRoute, prefix="/api/v1", tags=["Steering presets"], responses=ERROR_RESPONSES)


@router.post("/presets", response_model=PresetOut, status_code=201, summary="Create a steering preset")
async def create(body: PresetCreateRequest, runtime: RuntimeDep) -> PresetOut:
    """The preset's name becomes a model id in GET /v1/models; `model: "<name>"` on the OpenAI routes (and
    on Neuronpedia's, or `preset` on /api/v1/generate) steers with it."""
    return create_preset(runtime, body)


@router.get("/presets", response_model=PresetList, summary="List the steering presets")
async def presets(runtime: RuntimeDep) -> PresetList:
    return list_presets(runtime)


@router.get("/presets/{name}", response_model=PresetOut, summary="One steering preset")
async def preset(name: str, runtime: RuntimeDep) -> PresetOut:
    return show_preset(runtime, name)


@router.delete("/presets/{name}", response_model=PresetDeleted, summary="Remove a steering preset")
async def delete(name: str, runtime: RuntimeDep) -> PresetDeleted:
    return delete_preset(runtime, name)
