"""text_completion SSE chunks (OpenAI's legacy streaming format) from a job's events.

Per choice: with `echo`, first a chunk with the prompt (and its logprobs, which the row's first token
event carries); then text deltas, each with the logprobs of the tokens since the previous delta; a stop
string is never partly streamed (the last (longest stop - 1) characters wait for the row's end); then a
chunk with the finish reason; the usage chunk last with `stream_options.include_usage`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from api.services.chat_common import sse_frames
from api.services.openai_completions import PreparedCompletion, logprobs_object, usage_of
from infrastructure.engine.job import Event, JobFailed, RowFinished, RowToken

log = logging.getLogger(__name__)


class _Choice:
    """What one choice has streamed so far."""

    def __init__(self) -> None:
        self.echoed = False
        self.sent = 0  # characters of the completion sent
        self.offset = 0  # text_offset of the next token
        self.pending: list = []  # logprobs of tokens not sent yet
        self.seen = 0  # tokens whose logprobs reached `pending`


def _chunk(prep: PreparedCompletion, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return {
        "id": prep.id,
        "object": "text_completion",
        "created": prep.created,
        "model": prep.model,
        "choices": [choice],
    }


def _echo(prep: PreparedCompletion, i: int, state: _Choice, scored: list | None) -> dict:
    ids = prep.rows[i].prompt_ids
    lp = None
    if prep.logprobs is not None:
        lp = logprobs_object(prep.tokenizer, scored or [None] * len(ids), ids, prep.logprobs, 0)
    state.echoed, state.offset = True, len(prep.prompt_texts[i])
    return _chunk(prep, i, prep.prompt_texts[i], lp, None)


def _delta(prep: PreparedCompletion, i: int, state: _Choice, text: str) -> dict:
    lp = None
    if prep.logprobs is not None:
        ids = [e.token_id for e in state.pending]
        lp = logprobs_object(prep.tokenizer, state.pending, ids, prep.logprobs, state.offset)
        state.offset += sum(len(t) for t in lp["tokens"])
        state.pending = []
    return _chunk(prep, i, text, lp, None)


async def chunks(prep: PreparedCompletion, events: AsyncIterator[Event]) -> AsyncIterator[dict]:
    holdback = max((len(s) for s in prep.rows[0].sampling.stop), default=1) - 1
    states = [_Choice() for _ in prep.rows]
    done: list[RowFinished] = []
    async for event in events:
        if isinstance(event, JobFailed):
            raise event.error
        if isinstance(event, (RowToken, RowFinished)):
            state = states[event.row]
            if prep.echo and not state.echoed:
                yield _echo(prep, event.row, state, event.prompt_logprobs)
            new = (event.logprobs or [])[state.seen :] if isinstance(event, RowFinished) else event.logprobs or []
            state.pending += new
            state.seen += len(new)
        if isinstance(event, RowToken):
            safe = len(event.text) - holdback
            if safe > state.sent:
                yield _delta(prep, event.row, state, event.text[state.sent : safe])
                state.sent = safe
        elif isinstance(event, RowFinished):
            done.append(event)
            if len(event.text) > state.sent or state.pending:
                yield _delta(prep, event.row, state, event.text[state.sent :])
            yield _chunk(prep, event.row, "", None, event.finish_reason)
    if prep.include_usage:
        usage = usage_of(prep, done).model_dump()
        yield {
            "id": prep.id,
            "object": "text_completion",
            "created": prep.created,
            "model": prep.model,
            "choices": [],
            "usage": usage,
        }


def sse(prep: PreparedCompletion, events: AsyncIterator[Event]) -> AsyncIterator[str]:
    """`data: {chunk}` frames, then `data: [DONE]` (`chat_common.sse_frames`; closing it cancels the job)."""
    return sse_frames(chunks(prep, events), events, log)
