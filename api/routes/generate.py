"""POST /api/v1/generate and /api/v1/generate/baseline (seed 002)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import RuntimeDep
from api.disconnect import until_disconnected
from api.routing import JSONRoute
from api.schemas.common import ERROR_RESPONSES
from api.schemas.generate import BaselineRequest, GenerateRequest, GenerateResponse
from api.services.generate import run_generate

router = APIRouter(route_class=JSONRoute, prefix="/api/v1", tags=["Persona Serving API"], responses=ERROR_RESPONSES)


@router.post("/generate", response_model=GenerateResponse, summary="Generate with persona steering")
async def generate(body: GenerateRequest, runtime: RuntimeDep, request: Request) -> GenerateResponse:
    """One user turn steered by one trait (`trait`, `scalar`, `layer`) or several (`traits`)."""
    return await until_disconnected(request, run_generate(runtime, body))


@router.post("/generate/baseline", response_model=GenerateResponse, summary="Generate without steering")
async def generate_baseline(body: BaselineRequest, runtime: RuntimeDep, request: Request) -> GenerateResponse:
    """The same generation with no steering; same seed => same text as `generate` with scalar 0."""
    return await until_disconnected(request, run_generate(runtime, body))
