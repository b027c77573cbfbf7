"""chat.completion.chunk SSE frames from a job's events.

Content deltas hold back the last (longest stop string - 1) characters of each choice until the
row ends, so a stop string is never partly streamed (streamed text == non-streamed text). The
final chunk carries `assistant_axis` when asked: the usage chunk with `include_usage`, else the
chunk that finishes the last choice."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from api.services.chat_common import sse_frames
from api.services.openai_chat import PreparedChat, axis_fields, usage_of
from infrastructure.engine.job import Event, JobFailed, RowFinished, RowToken

log = logging.getLogger(__name__)


def chunk(chat: PreparedChat, choices: list[dict], **extra: object) -> dict:
    return {
        "id": chat.id,
        "object": "chat.completion.chunk",
        "created": chat.created,
        "model": chat.model,
        "choices": choices,
        **extra,
    }


def _delta(chat: PreparedChat, index: int, content: str, pending: list[list]) -> dict:
    """A content delta; with logprobs, it carries those of the tokens generated since the last delta."""
    choice = {"index": index, "delta": {"content": content}, "finish_reason": None}
    if chat.top_logprobs is not None:
        choice["logprobs"] = chat.logprobs_of(pending[index])
        pending[index] = []
    return choice


async def chunks(chat: PreparedChat, events: AsyncIterator[Event]) -> AsyncIterator[dict]:
    """Role chunk, content chunks, one finish chunk per choice, then the usage chunk if asked."""
    n = len(chat.rows)
    holdback = max((len(s) for s in chat.rows[0].sampling.stop), default=1) - 1
    sent = [0] * n
    pending: list[list] = [[] for _ in range(n)]  # logprobs of tokens not yet sent in a delta
    seen = [0] * n  # tokens whose logprobs reached `pending`
    done: dict[int, RowFinished] = {}
    yield chunk(
        chat, [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n)]
    )
    async for event in events:
        if isinstance(event, JobFailed):
            raise event.error
        if isinstance(event, RowToken):
            if event.logprobs:
                pending[event.row] += event.logprobs
                seen[event.row] += len(event.logprobs)
            safe = len(event.text) - holdback
            if safe > sent[event.row]:
                yield chunk(chat, [_delta(chat, event.row, event.text[sent[event.row] : safe], pending)])
                sent[event.row] = safe
        elif isinstance(event, RowFinished):
            done[event.row] = event
            pending[event.row] += (event.logprobs or [])[seen[event.row] :]
            if len(event.text) > sent[event.row] or pending[event.row]:
                yield chunk(chat, [_delta(chat, event.row, event.text[sent[event.row] :], pending)])
            last = chunk(chat, [{"index": event.row, "delta": {}, "finish_reason": event.finish_reason}])
            if chat.monitor and len(done) == n and not chat.include_usage:
                last.update(axis_fields(chat, done))
            yield last
    if chat.include_usage:
        extra = axis_fields(chat, done) if chat.monitor else {}
        yield chunk(chat, [], usage=usage_of(chat, list(done.values())).model_dump(), **extra)


def sse(chat: PreparedChat, events: AsyncIterator[Event]) -> AsyncIterator[str]:
    """`data: {chunk}` frames, then `data: [DONE]` (`chat_common.sse_frames`; closing it cancels the job)."""
    return sse_frames(chunks(chat, events), events, log)
