"""Prompt scoring in the paged engine: a row asking for `prompt_logprobs` gets every prompt token's
log-probability from its own prefill, equal to a direct forward, in the same batch as generating rows,
chunked or not, steered or not; the index bookkeeping is unit-tested without a model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.engine.prompt_scores import kept_rows, sampling_rows, score_tokens
from infrastructure.steering.spec import SteeringSpec, add_op

TEXT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"


def test_kept_rows_and_sampling_rows():
    counts, scores, wants = [3, 1, 4, 2], [True, False, True, False], [False, True, True, False]
    keep, first = kept_rows(counts, scores, wants)
    assert keep == [0, 1, 2, 3, 4, 5, 6, 7]  # work 3 neither scores nor samples
    assert first == [0, None, 4, None]
    assert sampling_rows(counts, scores, wants, first) == [3, 7]


def test_score_tokens_values():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = score_tokens(logits, [2, 1], 2)
    lp = logits.log_softmax(-1)
    assert out[0].logprob == pytest.approx(float(lp[0, 2]))
    assert out[1].token_id == 1 and out[1].logprob == pytest.approx(float(lp[1, 1]))
    assert [t for t, _ in out[0].top] == [2, 1] and out[1].top[0][0] == 0
    assert score_tokens(logits, [0, 0], 0)[0].top == ()


def direct_scores(model, ids, steer=None) -> list[float]:
    """log p(token t | tokens < t) for t >= 1, from one plain forward (steered by a hook when asked)."""
    handle = None
    if steer is not None:
        layer, vector, scale = steer
        block = model.model.layers[layer]

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + scale * vector.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = block.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()
    lp = logits.log_softmax(-1)
    return [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]


async def test_scores_match_a_direct_forward_beside_generating_rows(loaded_model, engine):
    ids = tuple(loaded_model.tokenizer(TEXT)["input_ids"])
    vector = torch.randn(loaded_model.hidden_size, generator=torch.Generator().manual_seed(1))
    steer = SteeringSpec((add_op(10, vector, 4.0),))
    rows = [
        RowRequest(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=3)),
        RowRequest(ids, SamplingParams(max_new_tokens=4)),
        RowRequest(ids, SamplingParams(max_new_tokens=3, prompt_logprobs=0), steer),
    ]
    done = {d.row: d for d in await engine.collect(GenerationJob(rows))}
    plain = direct_scores(loaded_model.model, list(ids))
    steered = direct_scores(loaded_model.model, list(ids), (10, vector, 4.0))
    scored = done[0].prompt_logprobs
    assert scored[0] is None and len(scored) == len(ids)
    assert [e.logprob for e in scored[1:]] == pytest.approx(plain, abs=2e-4)
    assert [e.token_id for e in scored[1:]] == list(ids[1:])
    assert all(len(e.top) == 3 and e.top[0][1] >= e.logprob - 1e-6 for e in scored[1:])
    assert done[0].token_ids == [] and done[0].finish_reason == "length"
    assert done[1].prompt_logprobs is None and len(done[1].token_ids) == 4
    assert [e.logprob for e in done[2].prompt_logprobs[1:]] == pytest.approx(steered, abs=2e-4)
    assert steered != pytest.approx(plain, abs=1e-2)
    assert len(done[2].token_ids) == 3


async def test_chunked_prefill_scores_every_position(loaded_model):
    """With a step budget smaller than the prompt, the prompt is scored chunk by chunk, all of it."""
    small = PersonaEngine(loaded_model, max_batch_size=4, step_tokens=8, kv_cache_tokens=1024)
    small.start()
    try:
        assert small.wait_ready(60), small.broken
        ids = tuple(loaded_model.tokenizer(TEXT)["input_ids"])
        job = GenerationJob([RowRequest(ids, SamplingParams(max_new_tokens=1, prompt_logprobs=1))])
        (done,) = await asyncio.wait_for(small.collect(job), 60)
    finally:
        small.stop()
    plain = direct_scores(loaded_model.model, list(ids))
    assert len(ids) > 16
    assert [e.logprob for e in done.prompt_logprobs[1:]] == pytest.approx(plain, abs=2e-4)
