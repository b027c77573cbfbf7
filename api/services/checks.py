"""Request checks every surface shares: the served model's shape, the token limits (characters first, then
tokens) and prompt rendering off the event loop, refused with the field at fault before any model work."""

from __future__ import annotations

import asyncio

from api.services.ports import Serving
from infrastructure.errors import InvalidRequestError, TokenLimitError
from infrastructure.prompting import RenderedPrompt, longest_token_chars, render_chat
from infrastructure.steering.resolve import ModelShape, steering_value_limit


def served_ids(runtime: Serving) -> list[str]:
    """Every name the served model answers to: its logical and weights ids, and their last path segments."""
    loaded = runtime.loaded
    ids = [loaded.model_id, loaded.weights_id]
    ids += [i.rsplit("/", 1)[-1] for i in ids]
    return list(dict.fromkeys(ids))


def model_shape(runtime: Serving) -> ModelShape:
    loaded = runtime.loaded
    limit = steering_value_limit(loaded.dtype, runtime.settings.max_steering_value)
    return ModelShape(loaded.hidden_size, loaded.n_layers, limit)


def check_new_tokens(runtime: Serving, value: int, param: str) -> int:
    limit = runtime.settings.max_new_tokens_limit
    if value > limit:
        raise InvalidRequestError(f"{value} new tokens exceed the limit of {limit} (MAX_NEW_TOKENS_LIMIT)", param)
    return value


def prompt_token_limit(runtime: Serving) -> tuple[int, str]:
    """The longest prompt served, in tokens, and what sets it: TOKEN_LIMIT or the model's context."""
    limit = runtime.settings.token_limit
    engine = runtime.require_engine()
    context = getattr(engine, "context_len", limit + 1)
    if context - 1 < limit:
        return context - 1, f"the model's context is {context} tokens"
    return limit, "TOKEN_LIMIT"


def check_prompt_tokens(runtime: Serving, n_tokens: int, param: str = "prompt") -> None:
    limit, why = prompt_token_limit(runtime)
    if n_tokens > limit:
        raise TokenLimitError(f"Text too long: {n_tokens} tokens, max is {limit} ({why})", param)
    runtime.require_engine().check_prompt(n_tokens, param)


def check_prompt_chars(runtime: Serving, messages: list[dict], param: str = "prompt") -> None:
    """Refuse on characters alone a prompt that cannot fit in the token limit (n characters are at least
    n / longest-token tokens), before anything as costly as tokenising it happens."""
    limit, why = prompt_token_limit(runtime)
    chars = sum(len(m["content"]) for m in messages)
    if chars > limit * longest_token_chars(runtime.require_engine().tokenizer):
        raise TokenLimitError(f"Text too long: {chars} characters cannot fit in {limit} tokens ({why})", param)


def render_prompt_now(runtime: Serving, messages: list[dict], param: str = "prompt") -> RenderedPrompt:
    """The checked, templated and tokenised prompt (blocking: routes use `render_prompt`)."""
    check_prompt_chars(runtime, messages, param)
    prompt = render_chat(runtime.require_engine().tokenizer, messages, raw=runtime.settings.raw_chat_templates)
    check_prompt_tokens(runtime, len(prompt.ids), param)
    return prompt


async def render_prompt(runtime: Serving, messages: list[dict], param: str = "prompt") -> RenderedPrompt:
    """`render_prompt_now` on a worker thread: tokenising a long prompt must not stall every other client."""
    runtime.require_engine()
    check_prompt_chars(runtime, messages, param)  # cheap, and keeps hopeless prompts off the thread pool
    return await asyncio.to_thread(render_prompt_now, runtime, messages, param)
