"""Neuronpedia's steering routes: POST /v1/steer/completion-chat (also POST /generate, the path RunPod's
load-balancing endpoints forward to), POST /v1/steer/completion, and POST /runsync (RunPod's synchronous
envelope). Every error here is `{"error": "<message>", "type", "param"}` (see neuronpedia_wire.py)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.deps import RuntimeDep
from api.disconnect import until_disconnected
from api.routing import NeuronpediaRoute
from api.schemas.completion import CompletionRequest
from api.schemas.completion_chat import CompletionChatRequest, RunSyncRequest, RunSyncResponse
from api.services.completion import start_completion
from api.services.completion_chat import collect_frames, start_completion_chat
from api.services.finite import finite
from api.services.runpod_jobs import check_webhook, send_webhook
from api.services.steer_common import wants_stream
from api.services.steer_stream import SteerStream, last_of, sse_data

router = APIRouter(route_class=NeuronpediaRoute, tags=["Steering (Neuronpedia)"])

FLAT_ERROR = {
    "description": '`{"error": "<message>", "type": "...", "param": "..."}` (Neuronpedia\'s error shape)',
    "content": {"application/json": {"example": {"error": "layer 40 is out of range", "type": "hook_out_of_range"}}},
}
ERRORS = {status: FLAT_ERROR for status in (400, 401, 404, 422, 503)}
STREAM_DOC = {
    200: {
        "description": "SSE frames `data: {json}` (cumulative), or one JSON answer (the final frame) with "
        "`stream: false` or, when `stream` is absent, `Accept: application/json`.",
        "content": {"text/event-stream": {}},
    }
}


async def answer(stream: SteerStream, streaming: bool, request: Request):
    """SSE, or one JSON answer (the final frame; a client that leaves cancels the job, see until_disconnected)."""
    if not streaming:
        return JSONResponse(finite(await until_disconnected(request, last_of(stream))))
    return EventSourceResponse(sse_data(stream), sep="\n")


@router.post("/v1/steer/completion-chat", summary="Steered chat completion", responses={**ERRORS, **STREAM_DOC})
async def completion_chat(body: CompletionChatRequest, request: Request, runtime: RuntimeDep):
    """Generate the requested types (STEERED, DEFAULT) as rows of one batch; either casing, bare or `{"input": ...}`."""
    stream = await start_completion_chat(runtime, body)  # validation errors raise here, before any frame
    return await answer(stream, wants_stream(body.stream, request.headers.get("accept")), request)


@router.post(
    "/generate",
    summary="Steered chat completion (RunPod load-balancing path)",
    responses={**ERRORS, **STREAM_DOC},
)
async def generate_lb(body: CompletionChatRequest, request: Request, runtime: RuntimeDep):
    """The same as /v1/steer/completion-chat, at the path Neuronpedia's webapp posts to on a RunPod
    load-balancing endpoint (`https://ENDPOINT_ID.api.runpod.ai/generate`)."""
    return await completion_chat(body, request, runtime)


@router.post("/v1/steer/completion", summary="Steered raw-text completion", responses={**ERRORS, **STREAM_DOC})
async def completion(body: CompletionRequest, request: Request, runtime: RuntimeDep):
    """Complete a raw prompt (no chat template) as STEERED and/or DEFAULT rows of one batch."""
    stream = await start_completion(runtime, body)
    return await answer(stream, wants_stream(body.stream, request.headers.get("accept")), request)


@router.post("/runsync", response_model=RunSyncResponse, summary="RunPod-style synchronous run", responses=ERRORS)
async def runsync(
    body: RunSyncRequest, runtime: RuntimeDep, tasks: BackgroundTasks, request: Request
) -> RunSyncResponse:
    """Run a completion-chat input to the end; `output` is every frame, as RunPod's aggregated stream.
    RunPod's `policy.executionTimeout` (ms) bounds the run; `webhook` is POSTed the answer afterwards."""
    check_webhook(runtime.settings, body.webhook)
    timeout = body.policy.execution_timeout / 1000 if body.policy and body.policy.execution_timeout else None
    frames = await until_disconnected(request, collect_frames(runtime, body.input, timeout))
    answer_ = RunSyncResponse(id=body.id or f"sync-{uuid.uuid4()}", output=finite(frames))
    if body.webhook:
        tasks.add_task(send_webhook, body.webhook, answer_.model_dump())
    return answer_
