"""OpenAI legacy completions: request -> one job (prompts x n rows), answer or SSE chunks.

Scoring (`echo` + `logprobs`) is a row that asks the engine for its prompt tokens' logprobs: they come from
the row's own prefill in the batch it shares with every other request (`max_tokens: 0`: a prefill-only row).
Choice `i * n + j` is completion j of prompt i, as OpenAI numbers them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from api.schemas.common import Usage
from api.schemas.openai_completions import Completion, CompletionChoice, CompletionsRequest
from api.services.checks import check_new_tokens, check_prompt_tokens
from api.services.openai_logprobs import grammar_for, token_text
from api.services.openai_models import served_model
from api.services.ports import Serving
from api.services.presets import combined_steering
from infrastructure.engine.job import GenerationJob, RowFinished, RowRequest, SamplingParams, TokenLogprob
from infrastructure.errors import InvalidRequestError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this route
SEED_SPACE = 2**63


@dataclass
class PreparedCompletion:
    id: str
    created: int
    model: str
    rows: list[RowRequest]
    prompt_texts: list[str]  # per row: the prompt as text (what `echo` prepends)
    prompt_tokens: int  # every prompt's tokens, counted once
    echo: bool
    logprobs: int | None
    include_usage: bool
    tokenizer: Any


def _ids_of(tokenizer: Any, prompts: list[str | list[int]], vocab: int) -> list[tuple[int, ...]]:
    """Token ids of every prompt (texts tokenised as is, with the tokenizer's special tokens); ids checked."""
    out = []
    for i, p in enumerate(prompts):
        ids = tuple(tokenizer(p)["input_ids"]) if isinstance(p, str) else tuple(p)
        if not ids:
            raise InvalidRequestError("a prompt has no tokens", "prompt" if len(prompts) == 1 else f"prompt.{i}")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        out.append(ids)
    return out


def sampling_of(runtime: Serving, body: CompletionsRequest, j: int, grammar: str | None) -> SamplingParams:
    s = runtime.settings
    k = body.logprobs
    new_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    return SamplingParams(
        max_new_tokens=check_new_tokens(runtime, new_tokens, "max_tokens"),
        temperature=s.temperature if body.temperature is None else body.temperature,
        top_p=s.top_p if body.top_p is None else body.top_p,
        seed=None if body.seed is None else (body.seed + j) % SEED_SPACE,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        stop=body.stop_strings(),
        n_logprobs=max(1, k) if k is not None else 0,
        prompt_logprobs=k if k is not None and body.echo else None,
        grammar=grammar,
    )


async def prepared(runtime: Serving, body: CompletionsRequest) -> PreparedCompletion:
    """Validate and resolve everything (model / preset, steering, limits, grammar) before any model work."""
    engine = runtime.require_engine()
    model, preset = served_model(runtime, body.model)
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise InvalidRequestError("best_of other than n is not supported (no server-side ranking)", "best_of")
    if body.echo and body.logprobs is not None and getattr(engine, "decode_mode", "paged") != "paged":
        raise InvalidRequestError("scoring prompt tokens (echo + logprobs) needs DECODE_MODE=paged", "echo")
    steering = combined_steering(runtime, body.steering, preset)
    prompts = body.prompts()
    if len(prompts) * n > 256:
        raise InvalidRequestError(f"{len(prompts)} prompts x n={n} exceed 256 rows", "n")
    grammar = await grammar_for(runtime, body.response_format)
    vocab = int(runtime.loaded.model.config.vocab_size)
    ids = await asyncio.to_thread(_ids_of, engine.tokenizer, prompts, vocab)
    for i, p in enumerate(ids):
        check_prompt_tokens(runtime, len(p), "prompt" if len(ids) == 1 else f"prompt.{i}")
    texts = [p if isinstance(p, str) else engine.tokenizer.decode(list(q)) for p, q in zip(prompts, ids)]
    rows = [RowRequest(p, sampling_of(runtime, body, j, grammar), steering) for p in ids for j in range(n)]
    return PreparedCompletion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        rows=rows,
        prompt_texts=[t for t in texts for _ in range(n)],
        prompt_tokens=sum(len(p) for p in ids),
        echo=bool(body.echo),
        logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        tokenizer=engine.tokenizer,
    )


def logprobs_object(
    tokenizer: Any, entries: Sequence[TokenLogprob | None], ids: Sequence[int], k: int, offset: int
) -> dict:
    """Legacy `logprobs` over these tokens: a missing entry (the first prompt token) is null; text_offset
    starts at `offset` and adds each token's text length."""
    tokens, lps, tops, offsets = [], [], [], []
    for token_id, e in zip(ids, entries):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        lps.append(None if e is None else e.logprob)
        tops.append(None if e is None else {token_text(tokenizer, t): v for t, v in e.top[:k]})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def merged_logprobs(prep: PreparedCompletion, row: int, prompt: Sequence | None, generated: Sequence) -> dict:
    """The choice's logprobs: the prompt's (with echo) then its generated tokens'."""
    tok, k = prep.tokenizer, prep.logprobs
    parts = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    if prep.echo:
        ids = prep.rows[row].prompt_ids
        scored = logprobs_object(tok, prompt or [None] * len(ids), ids, k, 0)
        offset = len(prep.prompt_texts[row])
        for key in parts:
            parts[key] += scored[key]
    made = logprobs_object(tok, generated, [e.token_id for e in generated], k, offset)
    for key in parts:
        parts[key] += made[key]
    return parts


def choice_of(prep: PreparedCompletion, done: RowFinished) -> CompletionChoice:
    text = (prep.prompt_texts[done.row] if prep.echo else "") + done.text
    lp = None
    if prep.logprobs is not None:
        lp = merged_logprobs(prep, done.row, done.prompt_logprobs, done.logprobs or [])
    return CompletionChoice(index=done.row, text=text, logprobs=lp, finish_reason=done.finish_reason)


def usage_of(prep: PreparedCompletion, done: list[RowFinished]) -> Usage:
    completion = sum(d.completion_tokens for d in done)
    total = prep.prompt_tokens + completion
    return Usage(prompt_tokens=prep.prompt_tokens, completion_tokens=completion, total_tokens=total)


async def complete(runtime: Serving, body: CompletionsRequest) -> Completion:
    prep = await prepared(runtime, body)
    job = GenerationJob(prep.rows, timeout_s=runtime.settings.request_timeout_s)
    done = sorted(await runtime.require_engine().collect(job), key=lambda d: d.row)
    return Completion(
        id=prep.id,
        created=prep.created,
        model=prep.model,
        choices=[choice_of(prep, d) for d in done],
        usage=usage_of(prep, done),
    )
