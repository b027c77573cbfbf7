"""What the chat surfaces share (Neuronpedia's completion-chat and the OpenAI chat): the assistant-axis
capture each row asks for, the prompt's assistant turns it is summarised over, and the error body of a
stream that fails after it began."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from api.schemas.common import error_body
from api.services.completion_chat_frames import AxisView, axis_entry, turn_projections
from api.services.finite import dumps
from infrastructure.errors import PersonaError
from infrastructure.persona.axis_data import AssistantAxis
from infrastructure.prompting import RenderedPrompt
from infrastructure.steering.spec import Capture

AXIS_CAPTURE = "assistant_axis"
UNAVAILABLE = "assistant-axis monitoring is unavailable"


def axis_captures(axis: AssistantAxis | None) -> tuple[Capture, ...]:
    """The capture that records every position's projection on the axis (none without an axis)."""
    return (Capture(AXIS_CAPTURE, axis.layer, axis.direction),) if axis is not None else ()


def assistant_spans(messages: list[dict], prompt: RenderedPrompt) -> list[tuple[int, int] | None]:
    """Token span of each assistant message's content in the prompt (None: no content tokens)."""
    return [s for m, s in zip(messages, prompt.spans) if m["role"] == "assistant"]


@dataclass(frozen=True)
class AxisMonitor:
    """What a request needs to summarise its rows on the assistant axis: the axis (or why there is
    none), the prompt's assistant turns (their spans and texts) and where generation starts."""

    axis: AxisView | None
    problem: str
    spans: list[tuple[int, int] | None]
    prior: list[str]
    prompt_len: int

    def entry(self, type_: str, projections: Sequence[float], completion: str) -> dict:
        """One row's summary: a value per prior assistant turn and one for its own completion."""
        turns = turn_projections(projections, self.spans, self.prompt_len)
        return axis_entry(type_, self.axis, turns, [*self.prior, completion])


def axis_monitor(
    axis: AssistantAxis | None, problem: str | None, messages: list[dict], prompt: RenderedPrompt
) -> AxisMonitor:
    return AxisMonitor(
        axis=AxisView(axis.title, axis.value) if axis is not None else None,
        problem=problem or UNAVAILABLE,
        spans=assistant_spans(messages, prompt),
        prior=[m["content"] for m in messages if m["role"] == "assistant"],
        prompt_len=len(prompt.ids),
    )


def stream_error(exc: Exception, log: logging.Logger) -> dict:
    """The one error shape for a failure after a stream began: a domain error as it is, anything else
    logged and reported as an internal error (never its message)."""
    if isinstance(exc, PersonaError):
        return error_body(exc.type, exc.message, exc.param)
    log.error("stream failed", exc_info=exc)
    return error_body("internal_error", "internal server error")


async def sse_frames(stream: AsyncIterator[dict], events: AsyncIterator, log: logging.Logger) -> AsyncIterator[str]:
    """OpenAI's SSE framing of `stream`'s chunks: `data: {chunk}` frames, then `data: [DONE]`; a failure after
    the start is one error frame. Leaving early (client gone) closes the event stream, which cancels the job's
    rows."""
    try:
        async for item in stream:
            yield f"data: {dumps(item)}\n\n"
    except Exception as exc:
        yield f"data: {dumps(stream_error(exc, log))}\n\n"
    finally:
        await stream.aclose()
        await events.aclose()
    yield "data: [DONE]\n\n"
