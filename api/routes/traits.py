"""GET /api/v1/traits and /api/v1/traits/{name} (seed 002)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import RuntimeDep
from api.schemas.common import ERROR_RESPONSES
from api.schemas.traits import TraitDetail, TraitsResponse
from api.services.traits import list_traits, trait_detail

router = APIRouter(prefix="/api/v1", tags=["Persona Serving API"], responses=ERROR_RESPONSES)


@router.get("/traits", response_model=TraitsResponse, summary="List the traits that fit the loaded model")
async def traits(runtime: RuntimeDep) -> TraitsResponse:
    return list_traits(runtime)


@router.get("/traits/{name}", response_model=TraitDetail, summary="One trait: metadata and per-layer norms")
async def trait(name: str, runtime: RuntimeDep) -> TraitDetail:
    return trait_detail(runtime, name)
