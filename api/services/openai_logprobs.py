"""Engine logprobs in OpenAI's two wire formats, and what both OpenAI routes share to ask for them and
for structured output (`response_format` -> an llguidance grammar)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from api.schemas.openai_extras import ResponseFormat
from api.services.ports import Serving
from infrastructure.engine.grammar import check_grammar, json_schema_grammar
from infrastructure.engine.job import TokenLogprob
from infrastructure.errors import InvalidRequestError


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _entry(tokenizer: Any, token_id: int, logprob: float) -> dict:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], top: int) -> dict:
    """A chat choice's `logprobs`: `{content: [{token, logprob, bytes, top_logprobs: [...]}], refusal: null}`."""
    content = [
        {**_entry(tokenizer, e.token_id, e.logprob), "top_logprobs": [_entry(tokenizer, t, v) for t, v in e.top[:top]]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def grammar_of(runtime: Serving, fmt: ResponseFormat | None) -> str | None:
    """The grammar a `response_format` asks for (None for text), checked to compile (400 naming the field)."""
    if fmt is None or fmt.type == "text":
        return None
    schema = None
    if fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        try:
            json.dumps(schema, allow_nan=False)
        except ValueError as exc:
            raise InvalidRequestError(f"the schema is not JSON: {exc}", "response_format.json_schema.schema") from exc
    param = "response_format.json_schema.schema" if schema is not None else "response_format"
    try:
        grammar = json_schema_grammar(schema)
    except (ValueError, TypeError, RuntimeError) as exc:  # llguidance refuses the schema itself
        raise InvalidRequestError(f"the schema cannot be enforced: {str(exc)[:500]}", param) from exc
    check_grammar(grammar, runtime.require_engine().tokenizer, param)
    return grammar


async def grammar_for(runtime: Serving, fmt: ResponseFormat | None) -> str | None:
    """`grammar_of` off the event loop (the first call builds the tokenizer's token table, ~0.5 s)."""
    if fmt is None or fmt.type == "text":
        return None
    return await asyncio.to_thread(grammar_of, runtime, fmt)
