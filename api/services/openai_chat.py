"""OpenAI-compatible chat completions: request -> one job of `n` rows, answer or SSE chunks.

Everything that can be refused (model, fields, steering, limits, queue) is checked before the
stream starts, so those errors are proper HTTP errors in the one error shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from api.schemas.common import Usage
from api.schemas.openai import ChatCompletion, ChatCompletionRequest, Choice, MessageOut
from api.services.chat_common import AXIS_CAPTURE, AxisMonitor, axis_captures, axis_monitor
from api.services.checks import check_new_tokens, render_prompt, render_prompt_now
from api.services.openai_logprobs import chat_logprobs, grammar_for
from api.services.openai_models import served_model
from api.services.ports import Serving
from api.services.presets import combined_steering
from infrastructure.engine.job import Event, GenerationJob, RowFinished, RowRequest, SamplingParams, TokenLogprob
from infrastructure.prompting import RenderedPrompt

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
    top_logprobs: int | None = None  # logprobs asked: candidates per token (None: no logprobs)
    tokenizer: Any = None

    def logprobs_of(self, entries: list[TokenLogprob] | None) -> dict | None:
        """A choice's (or a chunk's) OpenAI `logprobs`, when the request asked for them."""
        if self.top_logprobs is None:
            return None
        return chat_logprobs(self.tokenizer, entries or [], self.top_logprobs)


def sampling_of(runtime: Serving, body: ChatCompletionRequest, choice: int, grammar: str | None) -> SamplingParams:
    """Choice i samples with seed + i, so choices differ and a seeded request is reproducible."""
    s = runtime.settings
    new_tokens = body.max_completion_tokens or body.max_tokens or s.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    return SamplingParams(
        max_new_tokens=check_new_tokens(runtime, new_tokens, param),
        temperature=s.temperature if body.temperature is None else body.temperature,
        top_p=s.top_p if body.top_p is None else body.top_p,
        seed=None if body.seed is None else (body.seed + choice) % SEED_SPACE,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        stop=body.stop_strings(),
        n_logprobs=max(1, body.top_logprobs or 0) if body.logprobs else 0,
        grammar=grammar,
    )


def prepare(
    runtime: Serving, body: ChatCompletionRequest, prompt: RenderedPrompt | None = None, grammar: str | None = None
) -> PreparedChat:
    """Validate and resolve everything before any model work; `prompt`: the messages already rendered off
    the event loop (`render_prompt`); `grammar`: the `response_format`'s (`grammar_for`)."""
    runtime.require_engine()
    model, preset = served_model(runtime, body.model)
    steering = combined_steering(runtime, body.steering, preset)
    messages = [m.as_dict() for m in body.messages]
    prompt = prompt or render_prompt_now(runtime, messages, "messages")
    axis = runtime.axis if body.persona_monitoring else None
    captures = axis_captures(axis)
    n = body.n or 1
    rows = [RowRequest(prompt.ids, sampling_of(runtime, body, i, grammar), steering, captures) for i in range(n)]
    return PreparedChat(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        rows=rows,
        prompt_len=len(prompt.ids),
        monitor=bool(body.persona_monitoring),
        axes=axis_monitor(axis, runtime.axis_problem, messages, prompt),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        tokenizer=runtime.require_engine().tokenizer,
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


async def prepared(runtime: Serving, body: ChatCompletionRequest) -> PreparedChat:
    """`prepare` with the prompt rendered and the grammar compiled off the event loop."""
    runtime.require_engine()
    served_model(runtime, body.model)  # an unknown model is refused before any work
    grammar = await grammar_for(runtime, body.response_format)
    prompt = await render_prompt(runtime, [m.as_dict() for m in body.messages], "messages")
    return prepare(runtime, body, prompt, grammar)


async def complete(runtime: Serving, body: ChatCompletionRequest) -> ChatCompletion:
    """A non-streaming chat.completion."""
    chat = await prepared(runtime, body)
    done = await runtime.require_engine().collect(
        GenerationJob(chat.rows, timeout_s=runtime.settings.request_timeout_s)
    )
    extra = axis_fields(chat, {d.row: d for d in done}) if chat.monitor else {}
    choices = [
        Choice(
            index=d.row,
            message=MessageOut(content=d.text),
            finish_reason=d.finish_reason,
            logprobs=chat.logprobs_of(d.logprobs),
        )
        for d in done
    ]
    return ChatCompletion(
        id=chat.id, created=chat.created, model=chat.model, choices=choices, usage=usage_of(chat, done), **extra
    )


async def start(runtime: Serving, body: ChatCompletionRequest) -> tuple[PreparedChat, AsyncIterator[Event]]:
    """Validate and submit (queue limits raise here); the caller turns the events into chunks."""
    chat = await prepared(runtime, body)
    job = GenerationJob(chat.rows, timeout_s=runtime.settings.request_timeout_s)
    return chat, runtime.require_engine().submit(job)
