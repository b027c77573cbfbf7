"""Seed 000's steered completion-chat: one job whose rows are the requested types (STEERED with the
request's steering, DEFAULT without), cumulative frames, and the assistant axis from captures.

Everything that can be refused is checked in `start_completion_chat` before any frame exists, so
HTTP can answer a 4xx; afterwards failures become an error frame (stream) or raise (collected)."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from api.schemas.completion_chat import CompletionChatRequest
from api.services.checks import check_new_tokens, model_shape, render_prompt, render_prompt_now
from api.services.completion_chat_frames import AxisView, ChatContext, assistant_axis, error_frame, final_frame, frame
from api.services.finite import dumps
from app.runtime import Runtime
from infrastructure.engine.job import Event, GenerationJob, JobFailed, RowFinished, RowRequest, RowToken, SamplingParams
from infrastructure.errors import InvalidRequestError, PersonaError
from infrastructure.prompting import RenderedPrompt
from infrastructure.steering.resolve import VectorRef, resolve_steering
from infrastructure.steering.spec import Capture, Method, SteeringSpec

log = logging.getLogger(__name__)

AXIS_CAPTURE = "assistant_axis"


@dataclass(frozen=True)
class PreparedChat:
    """A validated request: its rows (one per type, in `types` order) and what frames need."""

    ctx: ChatContext
    rows: list[RowRequest]
    prompt_len: int
    assistant_spans: list[tuple[int, int] | None]
    axis: AxisView | None
    axis_problem: str | None


def resolve_vectors(runtime: Runtime, body: CompletionChatRequest) -> SteeringSpec | None:
    """The request's vectors as a SteeringSpec (raw floats or stored traits; ADD or CAP)."""
    method = Method.CAP if body.steer_method == "PROJECTION_CAP" else Method.ADD
    refs = [
        VectorRef(
            param=f"vectors.{i}",
            scale=body.strength_multiplier * v.strength,
            trait=v.trait,
            values=v.steering_vector,
            hook=v.hook,
            method=method,
            normalize=body.normalize_steering,
            values_field="steering_vector",
        )
        for i, v in enumerate(body.vectors)
    ]
    return resolve_steering(
        refs,
        runtime.traits,
        model_shape(runtime),
        steer_special_tokens=body.steer_special_tokens,
        max_vectors=runtime.settings.max_vectors,
        max_layers=runtime.settings.max_layers,
    )


def sampling_of(runtime: Runtime, body: CompletionChatRequest) -> SamplingParams:
    """One SamplingParams for every row; without a seed one is drawn so STEERED and DEFAULT share it."""
    seed = body.seed if body.seed is not None else random.getrandbits(63)
    return SamplingParams(
        max_new_tokens=check_new_tokens(runtime, body.n_completion_tokens, "n_completion_tokens"),
        temperature=body.temperature,
        top_p=1.0,
        seed=seed,
        frequency_penalty=body.freq_penalty,
    )


def build_rows(
    runtime: Runtime, body: CompletionChatRequest, prompt: RenderedPrompt, steering: SteeringSpec | None
) -> list[RowRequest]:
    sampling = sampling_of(runtime, body)
    axis = runtime.axis
    captures = (Capture(AXIS_CAPTURE, axis.layer, axis.direction),) if axis is not None else ()
    mask = None if body.steer_special_tokens else prompt.content_mask
    return [
        RowRequest(prompt.ids, sampling, steering, captures, mask)
        if t == "STEERED"
        else RowRequest(prompt.ids, sampling, None, captures)
        for t in body.types
    ]


def prepare(runtime: Runtime, body: CompletionChatRequest, prompt: RenderedPrompt | None = None) -> PreparedChat:
    """Validate and resolve everything (vectors, hooks, token limits) before any model work; `prompt`: the
    messages already rendered off the event loop (`render_prompt`)."""
    runtime.require_engine()
    if "STEERED" in body.types and not body.vectors:
        raise InvalidRequestError("STEERED needs at least one vector", "vectors")
    steering = resolve_vectors(runtime, body) if body.vectors else None
    messages = [m.model_dump() for m in body.prompt]
    prompt = prompt or render_prompt_now(runtime, messages)
    rows = build_rows(runtime, body, prompt, steering)
    axis = runtime.axis
    spans = [s for m, s in zip(messages, prompt.spans) if m["role"] == "assistant"]
    return PreparedChat(
        ctx=ChatContext(messages=messages, prompt_text=prompt.text, types=list(body.types)),
        rows=rows,
        prompt_len=len(prompt.ids),
        assistant_spans=spans,
        axis=AxisView(axis.title, axis.value) if axis is not None else None,
        axis_problem=runtime.axis_problem,
    )


def last_frame(chat: PreparedChat, done: dict[int, RowFinished]) -> dict:
    completions = [done[i].text for i in range(len(chat.rows))]
    entries = None
    if chat.axis is not None:
        projections = [done[i].captures.get(AXIS_CAPTURE, []) for i in range(len(chat.rows))]
        entries = assistant_axis(chat.ctx, chat.axis, chat.assistant_spans, chat.prompt_len, completions, projections)
    return final_frame(chat.ctx, completions, entries, chat.axis_problem)


async def frames_of(chat: PreparedChat, events: AsyncIterator[Event]) -> AsyncIterator[dict]:
    """Cumulative frames from a job's events, then the final frame; raises the job's error."""
    texts = [""] * len(chat.rows)
    done: dict[int, RowFinished] = {}
    try:
        async for event in events:
            if isinstance(event, RowToken):
                texts[event.row] = event.text
                yield frame(chat.ctx, texts)
            elif isinstance(event, RowFinished):
                done[event.row] = event
            elif isinstance(event, JobFailed):
                raise event.error
        yield last_frame(chat, done)
    finally:
        await events.aclose()  # an abandoned job is cancelled: its rows leave the batch next step


async def start_completion_chat(runtime: Runtime, body: CompletionChatRequest) -> AsyncIterator[dict]:
    """Validate, submit the job (queue limits raise here), and return its frame stream."""
    prompt = await render_prompt(runtime, [m.model_dump() for m in body.prompt])
    chat = prepare(runtime, body, prompt)
    job = GenerationJob(chat.rows, timeout_s=runtime.settings.request_timeout_s)
    events = runtime.require_engine().submit(job)
    return frames_of(chat, events)


async def guarded(frames: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """Frames as they come; a failure after the stream began becomes one error frame, then the end."""
    try:
        async for item in frames:
            yield item
    except PersonaError as exc:
        yield error_frame(exc.type, exc.message, exc.param)
    except Exception:
        log.exception("completion-chat stream failed")
        yield error_frame("internal_error", "internal server error")
    finally:
        await frames.aclose()


async def sse_data(frames: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """The SSE events of a stream (guarded frames as JSON), already encoded: compact JSON has no line break to
    split, so sse-starlette's per-event line scan (a third of the encoding time at 64 streams) is skipped."""
    stream = guarded(frames)
    try:
        async for item in stream:
            yield b"data: " + dumps(item).encode() + b"\n\n"
    finally:
        await stream.aclose()


async def collect_frames(runtime: Runtime, body: CompletionChatRequest) -> list[dict]:
    """Every frame of a request, for /runsync and `stream: false` (errors raise)."""
    frames = await start_completion_chat(runtime, body)
    return [item async for item in frames]


async def final_frame_of(runtime: Runtime, body: CompletionChatRequest) -> dict:
    """Only the final frame (`stream: false`); errors raise."""
    last: dict = {}
    async for item in await start_completion_chat(runtime, body):
        last = item
    return last
