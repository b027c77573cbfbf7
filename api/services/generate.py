"""Seed 002's generate and baseline: one user turn, optional trait steering, one row."""

from __future__ import annotations

import asyncio

from api.schemas.common import Usage
from api.schemas.generate import AppliedTrait, BaselineRequest, GenerateRequest, GenerateResponse
from app.runtime import Runtime
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.errors import InvalidRequestError, TokenLimitError
from infrastructure.prompting import RenderedPrompt, longest_token_chars, render_chat
from infrastructure.steering.resolve import ModelShape, VectorRef, resolve_steering, steering_value_limit


def model_shape(runtime: Runtime) -> ModelShape:
    loaded = runtime.loaded
    limit = steering_value_limit(loaded.dtype, runtime.settings.max_steering_value)
    return ModelShape(loaded.hidden_size, loaded.n_layers, limit)


def check_new_tokens(runtime: Runtime, value: int, param: str) -> int:
    limit = runtime.settings.max_new_tokens_limit
    if value > limit:
        raise InvalidRequestError(f"{value} new tokens exceed the limit of {limit} (MAX_NEW_TOKENS_LIMIT)", param)
    return value


def prompt_token_limit(runtime: Runtime) -> tuple[int, str]:
    """The longest prompt served, in tokens, and what sets it: TOKEN_LIMIT or the model's context."""
    limit = runtime.settings.token_limit
    context = runtime.engine.context_len if runtime.engine is not None else limit + 1
    if context - 1 < limit:
        return context - 1, f"the model's context is {context} tokens"
    return limit, "TOKEN_LIMIT"


def check_prompt_tokens(runtime: Runtime, n_tokens: int, param: str = "prompt") -> None:
    limit, why = prompt_token_limit(runtime)
    if n_tokens > limit:
        raise TokenLimitError(f"Text too long: {n_tokens} tokens, max is {limit} ({why})", param)
    runtime.engine.check_prompt(n_tokens, param)


def check_prompt_chars(runtime: Runtime, messages: list[dict], param: str = "prompt") -> None:
    """Refuse on characters alone a prompt that cannot fit in the token limit (n characters are at least
    n / longest-token tokens), before anything as costly as tokenising it happens."""
    limit, why = prompt_token_limit(runtime)
    chars = sum(len(m["content"]) for m in messages)
    if chars > limit * longest_token_chars(runtime.engine.tokenizer):
        raise TokenLimitError(f"Text too long: {chars} characters cannot fit in {limit} tokens ({why})", param)


def render_prompt_now(runtime: Runtime, messages: list[dict], param: str = "prompt") -> RenderedPrompt:
    """The checked, templated and tokenised prompt (blocking: routes use `render_prompt`)."""
    check_prompt_chars(runtime, messages, param)
    prompt = render_chat(runtime.engine.tokenizer, messages, raw=runtime.settings.raw_chat_templates)
    check_prompt_tokens(runtime, len(prompt.ids), param)
    return prompt


async def render_prompt(runtime: Runtime, messages: list[dict], param: str = "prompt") -> RenderedPrompt:
    """`render_prompt_now` on a worker thread: tokenising a long prompt must not stall every other client."""
    runtime.require_engine()
    check_prompt_chars(runtime, messages, param)  # cheap, and keeps hopeless prompts off the thread pool
    return await asyncio.to_thread(render_prompt_now, runtime, messages, param)


def sampling_from(runtime: Runtime, body: BaselineRequest | GenerateRequest) -> SamplingParams:
    s = runtime.settings
    return SamplingParams(
        max_new_tokens=check_new_tokens(runtime, body.max_tokens or s.max_tokens, "max_tokens"),
        temperature=s.temperature if body.temperature is None else body.temperature,
        top_p=s.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
    )


async def run_generate(runtime: Runtime, body: BaselineRequest | GenerateRequest) -> GenerateResponse:
    engine = runtime.require_engine()
    applied: list[AppliedTrait] = []
    steering = None
    if isinstance(body, GenerateRequest):
        steers = body.steers()
        prefix = "traits" if body.traits is not None else None
        refs = [
            VectorRef(
                param=f"{prefix}.{i}" if prefix else "", scale=t.scalar, trait=t.trait, hook=t.layer, hook_field="layer"
            )
            for i, t in enumerate(steers)
        ]
        steering = resolve_steering(
            refs,
            runtime.traits,
            model_shape(runtime),
            max_vectors=runtime.settings.max_vectors,
            max_layers=runtime.settings.max_layers,
        )
        applied = [AppliedTrait(trait=t.trait, scalar=t.scalar, layer=op.site) for t, op in zip(steers, steering.ops)]
    prompt = await render_prompt(runtime, [{"role": "user", "content": body.prompt}])
    job = GenerationJob(
        [RowRequest(prompt.ids, sampling_from(runtime, body), steering)], timeout_s=runtime.settings.request_timeout_s
    )
    [done] = await engine.collect(job)
    single = applied[0] if len(applied) == 1 and isinstance(body, GenerateRequest) and body.traits is None else None
    return GenerateResponse(
        text=done.text,
        trait=single.trait if single else None,
        scalar=single.scalar if single else None,
        layer=single.layer if single else None,
        traits=applied,
        model=runtime.loaded.model_id,
        finish_reason=done.finish_reason,
        usage=Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
        ),
    )
