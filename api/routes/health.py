"""GET /health (no auth; 503 until the model is loaded and warmed) and GET /status."""

from __future__ import annotations

from fastapi import APIRouter, Response
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


@router.get("/ping", summary="RunPod load-balancing health check", responses={204: {"description": "Loading"}})
async def ping(runtime: RuntimeDep):
    """What RunPod's load balancer polls: 200 when the model serves, 204 while it loads, 503 when it failed."""
    state = runtime.state
    if state == "ok":
        return JSONResponse({"status": "healthy"})
    if state == "loading":
        return Response(status_code=204)
    return JSONResponse({"status": state}, status_code=503)


@router.get("/status", response_model=StatusResponse, summary="Model, devices, traits, queue and uptime")
async def get_status(runtime: RuntimeDep) -> StatusResponse:
    return status(runtime)
