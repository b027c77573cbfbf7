"""Render a chat with the model's template and locate each message's content tokens.

Content spans serve two features: `steer_special_tokens=false` (only content positions are
steered in the prompt) and assistant-axis monitoring (one value per assistant turn's content)."""

from __future__ import annotations

import threading
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


def added_token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The strings the tokenizer turns into added (control) tokens wherever they appear in a text."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {getattr(tok, "content", str(tok)) for tok in decoder.values()}
    return tuple(sorted(t for t in texts if t))


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the vocabulary's longest token: a text of n characters has at least n / this many
    tokens, so a prompt can be refused on its length before it is tokenised. Cached per tokenizer."""
    key = id(tokenizer)
    if key not in _LONGEST:
        vocab = tokenizer.get_vocab()
        _LONGEST[key] = max((len(tokenizer.convert_tokens_to_string([t])) for t in vocab), default=1) or 1
    return _LONGEST[key]


_LONGEST: dict[int, int] = {}
# transformers switches `split_special_tokens` by mutating the shared Rust tokenizer; prompts are
# tokenised on worker threads, so every encode here holds this lock
_ENCODE_LOCK = threading.Lock()


def _encode(tokenizer: Any, text: str, plain: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`; `plain`: control-token text stays ordinary text."""
    try:
        with _ENCODE_LOCK:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=plain)
    except (TypeError, UnicodeError) as exc:  # e.g. a lone surrogate that reached this far
        raise InvalidRequestError(f"the prompt is not valid text: {type(exc).__name__}", "messages") from exc
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _forges_control_tokens(tokenizer: Any, messages: list[dict]) -> bool:
    texts = added_token_texts(tokenizer)
    return any(t in m["content"] for m in messages for t in texts)


def _segmented(tokenizer: Any, text: str, char_spans: list[tuple[int, int] | None]) -> tuple[list, list]:
    """Tokenise the template's text with its control tokens and every message content as plain text, so
    `<|im_start|>system` typed by a user stays characters and cannot open a turn it does not own."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    cursor = 0
    pieces = [(a, b, True) for a, b in (s for s in char_spans if s is not None)]
    for start, end, is_content in [*pieces, (len(text), len(text), False)]:
        for a, b, plain in ((cursor, start, False), (start, end, is_content)):
            if b > a:
                piece_ids, piece_offsets = _encode(tokenizer, text[a:b], plain)
                ids += piece_ids
                offsets += [(x + a, y + a) for x, y in piece_offsets]
        cursor = end
    return ids, offsets


def render_chat(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True, raw: bool = False
) -> RenderedPrompt:
    """The templated prompt, its ids, and each message's content tokens. Message contents never become
    control tokens (unless `raw`, the RAW_CHAT_TEMPLATES setting): a content holding control-token text is
    tokenised apart from the template, as plain text. Other prompts are tokenised in one piece."""
    text = render_text(tokenizer, messages, add_generation_prompt)
    char_spans = _char_spans(text, messages)
    if not raw and _forges_control_tokens(tokenizer, messages):
        if any(span is None and m["content"].strip() for span, m in zip(char_spans, messages)):
            raise InvalidRequestError("a message holds chat-template control text the template rewrote", "messages")
        ids, offsets = _segmented(tokenizer, text, char_spans)
    else:
        ids, offsets = _encode(tokenizer, text)
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
    return RenderedPrompt(text, tuple(ids), tuple(mask), tuple(token_spans))
