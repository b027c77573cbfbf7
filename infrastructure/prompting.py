"""Render a chat with the model's template and locate each message's content tokens.

Content spans serve two features: `steer_special_tokens=false` (only content positions are
steered in the prompt) and assistant-axis monitoring (one value per assistant turn's content)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infrastructure.errors import InvalidRequestError


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    ids: tuple[int, ...]
    content_mask: tuple[bool, ...]  # per token: inside some message's content
    spans: tuple[tuple[int, int] | None, ...]  # per message: [start, end) token range of its content


def render_text(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The templated prompt text; models without a chat template get plain `role: content` lines."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja templates raise on role orders they do not support
            raise InvalidRequestError(f"the model's chat template rejected the conversation: {exc}", "prompt") from exc
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + ("\nassistant: " if add_generation_prompt else "")


def _char_spans(text: str, messages: list[dict]) -> list[tuple[int, int] | None]:
    spans, cursor = [], 0
    for message in messages:
        content = message["content"].strip()
        start = text.find(content, cursor) if content else -1
        if start < 0:
            spans.append(None)
            continue
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return spans


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True) -> RenderedPrompt:
    text = render_text(tokenizer, messages, add_generation_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    char_spans = _char_spans(text, messages)
    mask = [False] * len(offsets)
    token_spans: list[tuple[int, int] | None] = []
    for span in char_spans:
        if span is None:
            token_spans.append(None)
            continue
        inside = [i for i, (a, b) in enumerate(offsets) if a >= span[0] - 1 and span[0] < b <= span[1]]
        for i in inside:
            mask[i] = True
        token_spans.append((inside[0], inside[-1] + 1) if inside else None)
    return RenderedPrompt(text, tuple(enc["input_ids"]), tuple(mask), tuple(token_spans))
