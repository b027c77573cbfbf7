"""Neuronpedia's steered completion-chat: one job whose rows are the requested types (STEERED with the
request's steering, DEFAULT without), cumulative frames, and the assistant axis from captures.

Everything that can be refused is checked in `prepare` before any frame exists, so HTTP can answer a
4xx; afterwards failures become an error frame (stream) or raise (collected)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from api.schemas.completion_chat import ROLE_AS, CompletionChatRequest
from api.services.chat_common import AXIS_CAPTURE, assistant_spans, axis_captures
from api.services.checks import render_prompt, render_prompt_now
from api.services.completion_chat_frames import AxisView, ChatContext, assistant_axis, final_frame, frame
from api.services.neuronpedia_wire import in_casing
from api.services.ports import Serving
from api.services.steer_common import check_model, np_logprobs, resolve_body_steering, sampling_of
from api.services.steer_stream import SteerStream, collect
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import Event, GenerationJob, JobFailed, RowFinished, RowRequest, RowToken, SamplingParams
from infrastructure.errors import PersonaError
from infrastructure.prompting import RenderedPrompt
from infrastructure.steering.spec import Method, SteeringSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedChat:
    """A validated request: its rows (one per type, in `types` order) and what frames need."""

    ctx: ChatContext
    rows: list[RowRequest]
    prompt_len: int
    assistant_spans: list[tuple[int, int] | None]
    axis: AxisView | None
    axis_problem: str | None
    camel: bool = False
    with_axis: bool = True
    tokenizer: Any = None


def build_rows(
    runtime: Serving,
    body: CompletionChatRequest,
    prompt: RenderedPrompt,
    steering: SteeringSpec | None,
    with_axis: bool,
) -> list[RowRequest]:
    sampling = sampling_of(runtime, body)
    axis = runtime.axis if with_axis else None
    captures = axis_captures(axis)
    mask = None if body.steer_special_tokens else prompt.content_mask
    return [
        RowRequest(prompt.ids, sampling, steering, captures, mask)
        if t == "STEERED"
        else RowRequest(prompt.ids, sampling, None, captures)
        for t in body.types
    ]


def templated(messages: list[dict]) -> list[dict]:
    """The messages as the chat template sees them (Neuronpedia's extra roles mapped to the template's)."""
    return [{"role": ROLE_AS.get(m["role"], m["role"]), "content": m["content"]} for m in messages]


def prepare(runtime: Serving, body: CompletionChatRequest, prompt: RenderedPrompt | None = None) -> PreparedChat:
    """Validate and resolve everything (model, vectors, features, hooks, token limits) before any model work;
    `prompt`: the messages already rendered off the event loop (`render_prompt`)."""
    engine = runtime.require_engine()
    check_model(runtime, body.model)
    steering = resolve_body_steering(runtime, body, body.steer_special_tokens)
    messages = [m.model_dump() for m in body.prompt]
    rendered = templated(messages)
    prompt = prompt or render_prompt_now(runtime, rendered)
    with_axis = body.is_assistant_axis is not False
    rows = build_rows(runtime, body, prompt, steering, with_axis)
    axis = runtime.axis
    spans = assistant_spans(rendered, prompt)
    return PreparedChat(
        ctx=ChatContext(messages=messages, prompt_text=prompt.text, types=list(body.types)),
        rows=rows,
        prompt_len=len(prompt.ids),
        assistant_spans=spans,
        axis=AxisView(axis.title, axis.value) if axis is not None and with_axis else None,
        axis_problem=runtime.axis_problem,
        camel=body.camel,
        with_axis=with_axis,
        tokenizer=engine.tokenizer,
    )


def capped(row: RowRequest) -> bool:
    return row.steering is not None and any(op.method is Method.CAP for op in row.steering.ops)


async def unsteered_projections(engine: PersonaEngine, chat: PreparedChat, done: dict[int, RowFinished]) -> dict:
    """Neuronpedia's pre-cap values for capped rows: the axis projections of the same conversation (prompt and
    the capped completion, every position the generation fed) through the model without steering; one job."""
    wanted = [i for i, row in enumerate(chat.rows) if capped(row) and row.captures]
    if not wanted:
        return {}
    requests = [
        RowRequest(
            chat.rows[i].prompt_ids + tuple(done[i].token_ids[:-1]),
            SamplingParams(max_new_tokens=1),
            None,
            chat.rows[i].captures,
        )
        for i in wanted
    ]
    try:
        finished = await engine.collect(GenerationJob(requests))
    except PersonaError as exc:  # e.g. the conversation no longer fits: the post-cap values stand alone
        log.warning("pre-cap projections skipped: %s", exc.message)
        return {}
    return {i: f.captures.get(AXIS_CAPTURE, []) for i, f in zip(wanted, finished)}


async def last_frame(engine: PersonaEngine, chat: PreparedChat, done: dict[int, RowFinished], logprobs: list) -> dict:
    completions = [done[i].text for i in range(len(chat.rows))]
    entries = None
    if chat.axis is not None:
        projections = [done[i].captures.get(AXIS_CAPTURE, []) for i in range(len(chat.rows))]
        pre = await unsteered_projections(engine, chat, done)
        pre_cap = [pre.get(i) for i in range(len(chat.rows))]
        entries = assistant_axis(
            chat.ctx, chat.axis, chat.assistant_spans, chat.prompt_len, completions, projections, pre_cap
        )
    return final_frame(chat.ctx, completions, entries, chat.axis_problem, logprobs, chat.with_axis)


async def frames_of(engine: PersonaEngine, chat: PreparedChat, events: AsyncIterator[Event]) -> AsyncIterator[dict]:
    """Cumulative frames (snake_case) from a job's events, then the final frame; raises the job's error."""
    n = len(chat.rows)
    texts = [""] * n
    wants_logprobs = bool(chat.rows) and chat.rows[0].sampling.n_logprobs > 0
    logprobs: list[list[dict] | None] = [[] if wants_logprobs else None for _ in range(n)]
    done: dict[int, RowFinished] = {}
    try:
        async for event in events:
            if isinstance(event, RowToken):
                texts[event.row] = event.text
                if wants_logprobs and event.logprobs:
                    logprobs[event.row] = [*logprobs[event.row], *np_logprobs(chat.tokenizer, event.logprobs)]
                yield frame(chat.ctx, texts, logprobs)
            elif isinstance(event, RowFinished):
                done[event.row] = event
                if wants_logprobs:
                    logprobs[event.row] = np_logprobs(chat.tokenizer, event.logprobs or [])
            elif isinstance(event, JobFailed):
                raise event.error
        yield await last_frame(engine, chat, done, logprobs)
    finally:
        await events.aclose()  # an abandoned job is cancelled: its rows leave the batch next step


async def cased(frames: AsyncIterator[dict], camel: bool) -> AsyncIterator[dict]:
    try:
        async for item in frames:
            yield in_casing(item, camel)
    finally:
        await frames.aclose()


async def start_completion_chat(
    runtime: Serving, body: CompletionChatRequest, timeout_s: float | None = None
) -> SteerStream:
    """Validate, submit the job (queue limits raise here), and return its frame stream in the caller's casing."""
    prompt = await render_prompt(runtime, templated([m.model_dump() for m in body.prompt]))
    chat = prepare(runtime, body, prompt)
    budget = runtime.settings.request_timeout_s
    budget = budget if timeout_s is None else min(timeout_s, budget)
    job = GenerationJob(chat.rows, timeout_s=budget)
    engine = runtime.require_engine()
    events = engine.submit(job)
    blank = in_casing(frame(chat.ctx, [""] * len(chat.rows)), chat.camel)
    return SteerStream(cased(frames_of(engine, chat, events), chat.camel), blank)


async def collect_frames(runtime: Serving, body: CompletionChatRequest, timeout_s: float | None = None) -> list[dict]:
    """Every frame of a request, for /runsync (errors raise)."""
    return await collect(await start_completion_chat(runtime, body, timeout_s))
