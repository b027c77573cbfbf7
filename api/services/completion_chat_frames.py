"""Pure frame building for completion-chat: cumulative outputs and the assistant-axis summary.

A frame is `{"outputs": [{"type", "raw", "chat_template", "logprobs"?}], "input": {"raw", "chat_template"}}`
(`logprobs` only when asked for); the final one adds `assistant_axis` (or an empty list plus
`assistant_axis_unavailable`) unless the caller turned it off. Frames are built in snake_case; the
caller's casing is applied on the way out (neuronpedia_wire.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SNIPPET_CHARS = 100
ASSISTANT_ROLES = ("assistant", "model")  # Neuronpedia's Gemma chats name the assistant `model`


@dataclass(frozen=True)
class ChatContext:
    """What every frame of one request shares: the messages and their templated text."""

    messages: list[dict]
    prompt_text: str
    types: list[str]


def output_entry(ctx: ChatContext, type_: str, completion: str, logprobs: list[dict] | None = None) -> dict:
    entry = {
        "type": type_,
        "raw": ctx.prompt_text + completion,
        "chat_template": [*ctx.messages, {"role": "assistant", "content": completion}],
    }
    if logprobs:  # Neuronpedia omits the key rather than send an empty list or null
        entry["logprobs"] = logprobs
    return entry


def frame(ctx: ChatContext, completions: Sequence[str], logprobs: Sequence[list[dict] | None] | None = None) -> dict:
    """One cumulative frame: every type's completion (and logprobs) so far."""
    logprobs = logprobs or [None] * len(completions)
    return {
        "outputs": [output_entry(ctx, t, c, lp) for t, c, lp in zip(ctx.types, completions, logprobs)],
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


def _value(axis: AxisView, values: list[float]) -> tuple[float | None, bool]:
    """The turn's axis value, and whether it was non-finite (JSON has no NaN: such a value becomes null)."""
    value = axis.value(values)
    if value is not None and not math.isfinite(value):
        return None, True
    return (None if value is None else round(value, 6)), False


def pc_values(axis: AxisView, values: list[float]) -> dict:
    return {axis.title: _value(axis, values)[0]}


def axis_entry(
    type_: str,
    axis: AxisView,
    turn_values: Sequence[list[float]],
    snippets: Sequence[str],
    post_cap: Sequence[list[float]] | None = None,
) -> dict:
    """One type's summary; with `post_cap` (a capped row), `pc_values` are the unsteered model's
    (Neuronpedia's pre-cap) and `pc_values_post_cap` the generation's own."""
    turns = []
    for i, (values, text) in enumerate(zip(turn_values, snippets)):
        turn = {"pc_values": pc_values(axis, values), "snippet": snippet(text)}
        non_finite = _value(axis, values)[1]
        if post_cap is not None:
            turn["pc_values_post_cap"] = pc_values(axis, post_cap[i])
            non_finite = non_finite or _value(axis, post_cap[i])[1]
        if non_finite:
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
    pre_cap: Sequence[Sequence[float] | None] | None = None,
) -> list[dict]:
    """One entry per type, one turn per assistant turn of the conversation including the new one.
    `pre_cap[i]` (capped rows only): the unsteered model's projections over row i's conversation."""
    prior = [m["content"] for m in ctx.messages if m["role"] in ASSISTANT_ROLES]
    pre_cap = pre_cap or [None] * len(projections)
    entries = []
    for type_, completion, row_proj, row_pre in zip(ctx.types, completions, projections, pre_cap):
        turns = turn_projections(row_proj, spans, prompt_len)
        snippets = [*prior, completion]
        if row_pre is None:
            entries.append(axis_entry(type_, axis, turns, snippets))
        else:
            entries.append(axis_entry(type_, axis, turn_projections(row_pre, spans, prompt_len), snippets, turns))
    return entries


def final_frame(
    ctx: ChatContext,
    completions: Sequence[str],
    axis_entries: list[dict] | None,
    problem: str | None,
    logprobs: Sequence[list[dict] | None] | None = None,
    with_axis: bool = True,
) -> dict:
    """The last frame: outputs, input, and (unless turned off) the assistant-axis summary or why there is none."""
    out = frame(ctx, completions, logprobs)
    if not with_axis:
        return out
    out["assistant_axis"] = axis_entries or []
    if axis_entries is None:
        out["assistant_axis_unavailable"] = problem or "assistant-axis monitoring is unavailable"
    return out
