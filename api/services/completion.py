"""Neuronpedia's raw-text steered completion (POST /v1/steer/completion): the prompt tokenised as is,
STEERED and DEFAULT as rows of one batch, cumulative frames `{"outputs": [{"type", "output", "logprobs"?}]}`
where `output` is the completion so far (without the prompt), as Neuronpedia's inference server sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from api.schemas.completion import CompletionRequest
from api.services.checks import check_prompt_chars, check_prompt_tokens
from api.services.completion_chat import cased
from api.services.neuronpedia_wire import in_casing
from api.services.ports import Serving
from api.services.steer_common import check_model, np_logprobs, resolve_body_steering, sampling_of
from api.services.steer_stream import SteerStream
from infrastructure.engine.job import Event, GenerationJob, JobFailed, RowFinished, RowRequest, RowToken


def completion_frame(types: Sequence[str], texts: Sequence[str], logprobs: Sequence[list | None]) -> dict:
    outputs = []
    for type_, text, lp in zip(types, texts, logprobs):
        entry = {"type": type_, "output": text}
        if lp:
            entry["logprobs"] = lp
        outputs.append(entry)
    return {"outputs": outputs}


def prompt_ids(tokenizer, prompt: str) -> tuple[int, ...]:
    """The prompt's tokens, with the BOS token first when the tokenizer has one (Neuronpedia prepends it)."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return tuple(ids)


async def frames_of(tokenizer, types: list[str], n_logprobs: int, events: AsyncIterator[Event]) -> AsyncIterator[dict]:
    n = len(types)
    texts = [""] * n
    logprobs: list[list | None] = [[] if n_logprobs else None for _ in range(n)]
    try:
        async for event in events:
            if isinstance(event, RowToken):
                texts[event.row] = event.text
                if n_logprobs and event.logprobs:
                    logprobs[event.row] = [*logprobs[event.row], *np_logprobs(tokenizer, event.logprobs)]
                yield completion_frame(types, texts, logprobs)
            elif isinstance(event, RowFinished):
                texts[event.row] = event.text
                if n_logprobs:
                    logprobs[event.row] = np_logprobs(tokenizer, event.logprobs or [])
            elif isinstance(event, JobFailed):
                raise event.error
        yield completion_frame(types, texts, logprobs)
    finally:
        await events.aclose()


async def start_completion(runtime: Serving, body: CompletionRequest) -> SteerStream:
    """Validate (model, vectors, features, limits), submit the job, and return its frames in the caller's casing."""
    engine = runtime.require_engine()
    check_model(runtime, body.model)
    steering = resolve_body_steering(runtime, body, steer_special_tokens=True)
    check_prompt_chars(runtime, [{"content": body.prompt}])  # cheap bound first; tokenising runs off the loop
    ids = await asyncio.to_thread(prompt_ids, engine.tokenizer, body.prompt)
    check_prompt_tokens(runtime, len(ids))
    sampling = sampling_of(runtime, body)
    rows = [RowRequest(ids, sampling, steering if t == "STEERED" else None) for t in body.types]
    events = engine.submit(GenerationJob(rows, timeout_s=runtime.settings.request_timeout_s))
    frames = frames_of(engine.tokenizer, list(body.types), sampling.n_logprobs, events)
    blank = in_casing(completion_frame(body.types, [""] * len(rows), [None] * len(rows)), body.camel)
    return SteerStream(cased(frames, body.camel), blank)
