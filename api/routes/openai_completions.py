"""POST /v1/completions: OpenAI's legacy completions (evaluation harnesses' log-likelihood route)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from api.deps import RuntimeDep
from api.disconnect import until_disconnected
from api.routes.openai import SSE_HEADERS
from api.routing import JSONRoute
from api.schemas.common import ERROR_RESPONSES
from api.schemas.openai_completions import UNSUPPORTED_COMPLETION_FIELDS, Completion, CompletionsRequest
from api.services.openai_completions import complete, prepared
from api.services.openai_completions_stream import sse
from infrastructure.engine.job import GenerationJob
from infrastructure.errors import InvalidRequestError

router = APIRouter(route_class=JSONRoute, prefix="/v1", tags=["OpenAI-compatible"], responses=ERROR_RESPONSES)


async def refuse_unsupported(request: Request) -> None:
    """Legacy fields that would change the answer and are not implemented: a 400 naming the field."""
    try:
        body = await request.json()
    except ValueError:
        return  # malformed JSON is reported by body validation
    if isinstance(body, dict):
        for name in UNSUPPORTED_COMPLETION_FIELDS:
            if body.get(name) not in (None, "", {}):
                raise InvalidRequestError(f"{name!r} is not supported by this server", name)


@router.post(
    "/completions",
    response_model=Completion,
    response_model_exclude_none=True,
    summary="Text completion (OpenAI legacy; echo + logprobs scores the prompt; stream with SSE)",
    dependencies=[Depends(refuse_unsupported)],
    responses={200: {"content": {"text/event-stream": {}}, "description": "text_completion, or chunks if stream"}},
)
async def completions(body: CompletionsRequest, runtime: RuntimeDep, request: Request):
    """`steering` is an extension (the client's `extra_body`); `model` may name a steering preset."""
    if not body.stream:
        return await until_disconnected(request, complete(runtime, body))
    prep = await prepared(runtime, body)
    events = runtime.require_engine().submit(GenerationJob(prep.rows, timeout_s=runtime.settings.request_timeout_s))
    return StreamingResponse(sse(prep, events), media_type="text/event-stream", headers=SSE_HEADERS)
