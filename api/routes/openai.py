"""POST /v1/chat/completions and GET /v1/models: OpenAI-compatible, with a `steering` extension."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from api.deps import RuntimeDep
from api.disconnect import until_disconnected
from api.routing import JSONRoute
from api.schemas.common import ERROR_RESPONSES
from api.schemas.openai import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList, unsupported_field
from api.services.openai_chat import complete, start
from api.services.openai_models import list_models, model_card
from api.services.openai_stream import sse
from infrastructure.errors import InvalidRequestError

router = APIRouter(route_class=JSONRoute, prefix="/v1", tags=["OpenAI-compatible"], responses=ERROR_RESPONSES)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def refuse_unsupported(request: Request) -> None:
    """OpenAI fields this server does not implement are a 400 naming the field, never ignored."""
    try:
        body = await request.json()
    except ValueError:
        return  # malformed JSON is reported by body validation
    name = unsupported_field(body)
    if name is not None:
        raise InvalidRequestError(f"{name!r} is not supported by this server", name)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    summary="Chat completion (OpenAI-compatible; stream with SSE)",
    dependencies=[Depends(refuse_unsupported)],
    responses={200: {"content": {"text/event-stream": {}}, "description": "chat.completion, or chunks if stream"}},
)
async def chat_completions(body: ChatCompletionRequest, runtime: RuntimeDep, request: Request):
    """`steering` and `persona_monitoring` are extensions (pass them with the client's `extra_body`)."""
    if not body.stream:
        return await until_disconnected(request, complete(runtime, body))
    chat, events = await start(runtime, body)
    return StreamingResponse(sse(chat, events), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/models", response_model=ModelList, summary="The served model and the steering presets")
async def models(runtime: RuntimeDep) -> ModelList:
    return list_models(runtime)


@router.get("/models/{model:path}", response_model=ModelCard, summary="One model (404 model_not_found if not served)")
async def model(model: str, runtime: RuntimeDep) -> ModelCard:
    return model_card(runtime, model)
