"""POST /api/v1/vectors/extract: the loaded model computes a steering vector from contrastive examples."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import RuntimeDep
from api.routing import JSONRoute
from api.schemas.common import ERROR_RESPONSES
from api.schemas.extract import ExtractRequest, ExtractResponse
from api.services.extract import run_extract, stream_extract

router = APIRouter(route_class=JSONRoute, prefix="/api/v1", tags=["Vector registry"], responses=ERROR_RESPONSES)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post(
    "/vectors/extract",
    response_model=ExtractResponse,
    status_code=201,
    summary="Extract a steering vector from contrastive examples and register it",
    responses={200: {"content": {"text/event-stream": {}}, "description": "With stream: true, SSE events"}},
)
async def extract_vector(body: ExtractRequest, runtime: RuntimeDep):
    """Teacher-forced forwards through the engine (no decoding): difference of mean answer activations per
    layer, layer and scalar range chosen on a held-out quarter of the examples, registered under `name`."""
    if body.stream:
        return StreamingResponse(
            await stream_extract(runtime, body), media_type="text/event-stream", headers=SSE_HEADERS
        )
    return await run_extract(runtime, body)
