"""OpenAI-compatible chat completions: request -> one job of `n` rows, answer or SSE chunks.

Everything that can be refused (model, fields, steering, limits, queue) is checked before the
stream starts, so those errors are proper HTTP errors in the one error shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from api.schemas.common import Usage
from api.schemas.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    MessageOut,
    ModelCard,
    ModelList,
    SteeringIn,
)
from api.services.chat_common import AXIS_CAPTURE, AxisMonitor, axis_captures, axis_monitor
from api.services.checks import check_new_tokens, model_shape, render_prompt, render_prompt_now
from api.services.ports import Serving
from infrastructure.engine.job import Event, GenerationJob, RowFinished, RowRequest, SamplingParams
from infrastructure.errors import UnknownModelError
from infrastructure.prompting import RenderedPrompt
from infrastructure.steering.resolve import VectorRef, resolve_steering
from infrastructure.steering.spec import Method, Positions, SteeringSpec

SEED_SPACE = 2**63


@dataclass
class PreparedChat:
    """A validated request: ids and names for the answer, the job's rows, and what monitoring needs."""

    id: str
    created: int
    model: str
    rows: list[RowRequest]
    prompt_len: int
    monitor: bool  # persona_monitoring asked
    axes: AxisMonitor
    include_usage: bool


def served_model(runtime: Serving, requested: str | None) -> str:
    """The served id; the weights id is accepted too, anything else is `model_not_found`."""
    loaded = runtime.loaded
    if requested is None or requested in (loaded.model_id, loaded.weights_id):
        return loaded.model_id
    raise UnknownModelError(f"The model {requested!r} does not exist; this server serves {loaded.model_id!r}", "model")


def list_models(runtime: Serving) -> ModelList:
    runtime.require_engine()
    return ModelList(data=[ModelCard(id=runtime.loaded.model_id, created=int(runtime.started_at))])


def model_card(runtime: Serving, model: str) -> ModelCard:
    runtime.require_engine()
    return ModelCard(id=served_model(runtime, model), created=int(runtime.started_at))


def steering_of(runtime: Serving, steering: SteeringIn | None) -> SteeringSpec | None:
    """The `steering` extension as a SteeringSpec (errors name e.g. `steering.vectors.0.layer`)."""
    if steering is None:
        return None
    refs = [
        VectorRef(
            param=f"steering.vectors.{i}",
            scale=v.scale,
            trait=v.trait,
            values=v.vector,
            hook=v.hook if v.hook is not None else v.layer,
            method=Method(steering.method),
            normalize=steering.normalize,
            values_field="vector",
            hook_field="hook" if v.hook is not None else "layer",
        )
        for i, v in enumerate(steering.vectors)
    ]
    s = runtime.settings
    return resolve_steering(
        refs,
        runtime.traits,
        model_shape(runtime),
        positions=Positions(steering.positions),
        max_vectors=s.max_vectors,
        max_layers=s.max_layers,
    )


def sampling_of(runtime: Serving, body: ChatCompletionRequest, choice: int) -> SamplingParams:
    """Choice i samples with seed + i, so choices differ and a seeded request is reproducible."""
    s = runtime.settings
    new_tokens = body.max_completion_tokens or body.max_tokens or s.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    return SamplingParams(
        max_new_tokens=check_new_tokens(runtime, new_tokens, param),
        temperature=s.temperature if body.temperature is None else body.temperature,
        top_p=s.top_p if body.top_p is None else body.top_p,
        seed=None if body.seed is None else (body.seed + choice) % SEED_SPACE,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        stop=body.stop_strings(),
    )


def prepare(runtime: Serving, body: ChatCompletionRequest, prompt: RenderedPrompt | None = None) -> PreparedChat:
    """Validate and resolve everything before any model work; `prompt`: the messages already rendered off
    the event loop (`render_prompt`)."""
    runtime.require_engine()
    model = served_model(runtime, body.model)
    steering = steering_of(runtime, body.steering)
    messages = [m.as_dict() for m in body.messages]
    prompt = prompt or render_prompt_now(runtime, messages, "messages")
    axis = runtime.axis if body.persona_monitoring else None
    captures = axis_captures(axis)
    rows = [RowRequest(prompt.ids, sampling_of(runtime, body, i), steering, captures) for i in range(body.n)]
    return PreparedChat(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        rows=rows,
        prompt_len=len(prompt.ids),
        monitor=body.persona_monitoring,
        axes=axis_monitor(axis, runtime.axis_problem, messages, prompt),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def axis_fields(chat: PreparedChat, done: dict[int, RowFinished]) -> dict:
    """`assistant_axis` (one entry per choice, one turn per assistant turn incl. the new one), or
    an empty list and `assistant_axis_unavailable` saying why."""
    if chat.axes.axis is None:
        return {"assistant_axis": [], "assistant_axis_unavailable": chat.axes.problem}
    entries = [
        {**chat.axes.entry("completion", done[i].captures.get(AXIS_CAPTURE, []), done[i].text), "index": i}
        for i in sorted(done)
    ]
    return {"assistant_axis": entries}


def usage_of(chat: PreparedChat, done: list[RowFinished]) -> Usage:
    completion = sum(d.completion_tokens for d in done)
    return Usage(prompt_tokens=chat.prompt_len, completion_tokens=completion, total_tokens=chat.prompt_len + completion)


async def rendered(runtime: Serving, body: ChatCompletionRequest) -> RenderedPrompt:
    return await render_prompt(runtime, [m.as_dict() for m in body.messages], "messages")


async def complete(runtime: Serving, body: ChatCompletionRequest) -> ChatCompletion:
    """A non-streaming chat.completion."""
    chat = prepare(runtime, body, await rendered(runtime, body))
    done = await runtime.require_engine().collect(
        GenerationJob(chat.rows, timeout_s=runtime.settings.request_timeout_s)
    )
    extra = axis_fields(chat, {d.row: d for d in done}) if chat.monitor else {}
    return ChatCompletion(
        id=chat.id,
        created=chat.created,
        model=chat.model,
        choices=[Choice(index=d.row, message=MessageOut(content=d.text), finish_reason=d.finish_reason) for d in done],
        usage=usage_of(chat, done),
        **extra,
    )


async def start(runtime: Serving, body: ChatCompletionRequest) -> tuple[PreparedChat, AsyncIterator[Event]]:
    """Validate and submit (queue limits raise here); the caller turns the events into chunks."""
    chat = prepare(runtime, body, await rendered(runtime, body))
    job = GenerationJob(chat.rows, timeout_s=runtime.settings.request_timeout_s)
    return chat, runtime.require_engine().submit(job)
