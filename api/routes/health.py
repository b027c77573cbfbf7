"""GET /health (no auth; 503 until the model is loaded and warmed) and GET /status."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import RuntimeDep
from api.schemas.traits import HealthResponse, StatusResponse
from api.services.traits import status

router = APIRouter(tags=["Monitoring"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(runtime: RuntimeDep) -> JSONResponse:
    state = runtime.state
    if state == "ok":
        return JSONResponse({"status": "ok"})
    detail = runtime.load_error or (runtime.engine.broken if runtime.engine else None)
    body = {"status": state} | ({"detail": detail} if detail else {})
    return JSONResponse(body, status_code=503)


@router.get("/status", response_model=StatusResponse, summary="Model, devices, traits, queue and uptime")
async def get_status(runtime: RuntimeDep) -> StatusResponse:
    return status(runtime)
