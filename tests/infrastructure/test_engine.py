"""The engine on the real embedded model: greedy answers, steering effects, batching equality, seeds."""

from __future__ import annotations

import asyncio

import torch

from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.steering.hooks import our_hooks
from infrastructure.steering.spec import Positions, SteeringSpec, add_op
from tests.helpers import chat_ids

GREEDY = SamplingParams(max_new_tokens=24)
LAYER = 15


def _vec(seed: int, norm: float = 40.0) -> torch.Tensor:
    v = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


async def _one(engine, ids, sampling=GREEDY, steering=None):
    [done] = await engine.collect(GenerationJob([RowRequest(ids, sampling, steering)]))
    return done


async def test_greedy_capital_of_france(engine):
    done = await _one(engine, chat_ids(engine.tokenizer, "What is the capital of France?"))
    assert "Paris" in done.text
    assert done.text == "The capital of France is Paris."
    assert done.finish_reason == "stop"
    assert our_hooks(engine.model) == []


async def test_steering_changes_text_and_zero_steering_is_exact_baseline(engine):
    ids = chat_ids(engine.tokenizer, "Tell me about the ocean.")
    base = await _one(engine, ids)
    steered = await _one(engine, ids, steering=SteeringSpec((add_op(LAYER, _vec(1, 120.0), 1.0),)))
    zero_scale = await _one(engine, ids, steering=SteeringSpec((add_op(LAYER, _vec(1, 120.0), 0.0),)))
    zero_vec = await _one(engine, ids, steering=SteeringSpec((add_op(LAYER, torch.zeros(576), 3.0),)))
    assert steered.text != base.text
    assert zero_scale.token_ids == base.token_ids
    assert zero_vec.token_ids == base.token_ids


async def test_steering_strength_is_monotonic_in_effect(engine):
    """Larger scales move generation further from the baseline (prefix shared with the baseline shrinks)."""
    ids = chat_ids(engine.tokenizer, "Describe your favourite food.")
    base = await _one(engine, ids)

    def shared_prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    prefixes = []
    for scale in (0.0, 1.0, 4.0):
        done = await _one(engine, ids, steering=SteeringSpec((add_op(LAYER, _vec(7, 60.0), scale),)))
        prefixes.append(shared_prefix(done.token_ids, base.token_ids))
    assert prefixes[0] == len(base.token_ids)
    assert prefixes[0] >= prefixes[1] >= prefixes[2]
    assert prefixes[2] < prefixes[0]


async def test_batched_rows_equal_the_same_requests_alone(engine):
    questions = ["Name a fruit.", "What is 2+2?", "Say hello.", "Name a colour."]
    rows = [
        RowRequest(chat_ids(engine.tokenizer, q), GREEDY, SteeringSpec((add_op(LAYER, _vec(i), 1.0),)) if i else None)
        for i, q in enumerate(questions)
    ]
    alone = [await _one(engine, r.prompt_ids, r.sampling, r.steering) for r in rows]
    together = await asyncio.gather(*(engine.collect(GenerationJob([r])) for r in rows))
    assert [t[0].token_ids for t in together] == [a.token_ids for a in alone]
    one_job = await engine.collect(GenerationJob(rows))
    assert [r.token_ids for r in one_job] == [a.token_ids for a in alone]
    assert engine.stats["max_batch"] >= 4


async def test_seed_makes_sampling_reproducible(engine):
    ids = chat_ids(engine.tokenizer, "Write a short poem about rain.")
    hot = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    a, b = await _one(engine, ids, hot), await _one(engine, ids, hot)
    others = [await _one(engine, ids, SamplingParams(max_new_tokens=20, temperature=1.0, seed=s)) for s in (1, 2)]
    assert a.token_ids == b.token_ids
    assert any(o.token_ids != a.token_ids for o in others)


async def test_max_new_tokens_and_stop_strings(engine):
    ids = chat_ids(engine.tokenizer, "Count from 1 to 20, separated by commas.")
    done = await _one(engine, ids, SamplingParams(max_new_tokens=5))
    assert done.finish_reason == "length" and done.completion_tokens == 5
    full = await _one(engine, ids, SamplingParams(max_new_tokens=40))
    marker = full.text[12:15]  # any piece of the greedy answer works as a stop string
    stop = await _one(engine, ids, SamplingParams(max_new_tokens=40, stop=("never appears", marker)))
    assert stop.finish_reason == "stop"
    assert stop.text == full.text[: full.text.index(marker)]


async def test_prompt_only_steering_leaves_decode_unsteered(engine):
    """positions=PROMPT steers the prompt only: first token may differ, but steering is not applied later."""
    ids = chat_ids(engine.tokenizer, "What is the capital of France?")
    spec = SteeringSpec((add_op(LAYER, _vec(3), 0.0),), positions=Positions.PROMPT)
    done = await _one(engine, ids, steering=spec)
    assert done.text == "The capital of France is Paris."


async def test_streamed_deltas_join_to_the_final_text(engine):
    ids = chat_ids(engine.tokenizer, "List three animals.")
    deltas, final = [], None
    async for event in engine.submit(GenerationJob([RowRequest(ids, SamplingParams(max_new_tokens=30))])):
        if hasattr(event, "delta"):
            deltas.append(event.delta)
        else:
            final = event
    assert "".join(deltas) == final.text
    assert len(deltas) > 3
