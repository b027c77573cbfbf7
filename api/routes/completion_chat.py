"""POST /v1/steer/completion-chat (Neuronpedia) and POST /runsync (RunPod's synchronous envelope)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.deps import RuntimeDep
from api.disconnect import until_disconnected
from api.routing import JSONRoute
from api.schemas.common import ERROR_RESPONSES
from api.schemas.completion_chat import CompletionChatRequest, RunSyncRequest, RunSyncResponse
from api.services.completion_chat import collect_frames, final_frame_of, sse_data, start_completion_chat
from api.services.finite import finite

router = APIRouter(route_class=JSONRoute, tags=["Steered completion-chat (Neuronpedia)"], responses=ERROR_RESPONSES)

STREAM_DOC = {
    200: {
        "description": "SSE frames `data: {json}` (cumulative), or with `stream: false` the final frame as JSON.",
        "content": {"text/event-stream": {}},
    }
}


@router.post("/v1/steer/completion-chat", summary="Steered chat completion (SSE)", responses=STREAM_DOC)
async def completion_chat(body: CompletionChatRequest, runtime: RuntimeDep, request: Request):
    """Generate the requested types (STEERED, DEFAULT) as rows of one batch; body bare or `{"input": ...}`."""
    if not body.stream:
        return JSONResponse(finite(await until_disconnected(request, final_frame_of(runtime, body))))
    frames = await start_completion_chat(runtime, body)  # validation errors raise here, before the stream
    return EventSourceResponse(sse_data(frames), sep="\n")


@router.post("/runsync", response_model=RunSyncResponse, summary="RunPod-style synchronous run")
async def runsync(body: RunSyncRequest, runtime: RuntimeDep, request: Request) -> RunSyncResponse:
    """Run a completion-chat input to the end; `output` is every frame, as RunPod's aggregated stream."""
    frames = await until_disconnected(request, collect_frames(runtime, body.input))
    return RunSyncResponse(id=body.id or f"sync-{uuid.uuid4()}", output=finite(frames))
