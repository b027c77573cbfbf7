"""Pure frame building for completion-chat: cumulative outputs and the assistant-axis summary.

A frame is `{"outputs": [{"type", "raw", "chat_template"}], "input": {"raw", "chat_template"}}`;
the final one adds `assistant_axis` (or an empty list plus `assistant_axis_unavailable`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SNIPPET_CHARS = 100


@dataclass(frozen=True)
class ChatContext:
    """What every frame of one request shares: the messages and their templated text."""

    messages: list[dict]
    prompt_text: str
    types: list[str]


def output_entry(ctx: ChatContext, type_: str, completion: str) -> dict:
    return {
        "type": type_,
        "raw": ctx.prompt_text + completion,
        "chat_template": [*ctx.messages, {"role": "assistant", "content": completion}],
    }


def frame(ctx: ChatContext, completions: Sequence[str]) -> dict:
    """One cumulative frame: every type's completion so far."""
    return {
        "outputs": [output_entry(ctx, t, c) for t, c in zip(ctx.types, completions)],
        "input": {"raw": ctx.prompt_text, "chat_template": list(ctx.messages)},
    }


def snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS].rstrip() + "…"


@dataclass(frozen=True)
class AxisView:
    """The assistant axis as frames need it: its title and how projections become a turn value."""

    title: str
    value: Callable[[list[float]], float | None]


def turn_projections(
    projections: Sequence[float], spans: Sequence[tuple[int, int] | None], prompt_len: int
) -> list[list[float]]:
    """Split one row's captured projections (prompt positions, then fed generated tokens) into the
    prompt's assistant turns (by token span; None: no content tokens) and the new turn (every
    generated position)."""
    turns = [list(projections[s[0] : s[1]]) if s else [] for s in spans]
    turns.append(list(projections[prompt_len:]))
    return turns


def axis_entry(type_: str, axis: AxisView, turn_values: Sequence[list[float]], snippets: Sequence[str]) -> dict:
    turns = []
    for values, text in zip(turn_values, snippets):
        value = axis.value(values)
        turn = {"pc_values": {axis.title: None if value is None else round(value, 6)}, "snippet": snippet(text)}
        if value is not None and not math.isfinite(value):  # JSON has no NaN: null, and say why
            turn["pc_values"][axis.title] = None
            turn["non_finite"] = True
        turns.append(turn)
    return {"type": type_, "pc_titles": [axis.title], "turns": turns}


def assistant_axis(
    ctx: ChatContext,
    axis: AxisView,
    spans: Sequence[tuple[int, int] | None],
    prompt_len: int,
    completions: Sequence[str],
    projections: Sequence[Sequence[float]],
) -> list[dict]:
    """One entry per type, one turn per assistant turn of the conversation including the new one."""
    prior = [m["content"] for m in ctx.messages if m["role"] == "assistant"]
    entries = []
    for type_, completion, row_proj in zip(ctx.types, completions, projections):
        turns = turn_projections(row_proj, spans, prompt_len)
        entries.append(axis_entry(type_, axis, turns, [*prior, completion]))
    return entries


def final_frame(
    ctx: ChatContext, completions: Sequence[str], axis_entries: list[dict] | None, problem: str | None
) -> dict:
    """The last frame: outputs, input, and the assistant-axis summary (or why there is none)."""
    out = frame(ctx, completions)
    out["assistant_axis"] = axis_entries or []
    if axis_entries is None:
        out["assistant_axis_unavailable"] = problem or "assistant-axis monitoring is unavailable"
    return out


def error_frame(type_: str, message: str, param: str | None = None) -> dict:
    body = {"type": type_, "message": message}
    if param:
        body["param"] = param
    return {"error": body}
