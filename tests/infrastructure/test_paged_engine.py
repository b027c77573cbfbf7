"""The paged engine end to end on the embedded model (CPU): prefix reuse (follow-up turns, STEERED rows whose
prompt is unsteered), preemption when the KV pool runs out, prefill-only rows, KV statistics."""

from __future__ import annotations

import asyncio

import pytest
import torch

from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.steering.spec import Capture, Positions, SteeringSpec, add_op
from tests.helpers import chat_ids


async def _one(engine, ids, n: int = 8, steering=None, captures=()):
    row = RowRequest(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), steering, captures)
    [done] = await engine.collect(GenerationJob([row]))
    return done


def _unit(seed: int, hidden: int = 576) -> torch.Tensor:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


async def test_a_repeated_prompt_reuses_its_blocks_and_gives_the_same_tokens(engine):
    ids = chat_ids(engine.tokenizer, "List three facts about the moon landing of 1969, in full sentences.")
    assert len(ids) > 2 * engine.block_size
    first = await _one(engine, ids)
    hits = engine.kv_stats()["prefix_hit_tokens"]
    again = await _one(engine, ids)
    assert engine.kv_stats()["prefix_hit_tokens"] - hits == (len(ids) - 1) // engine.block_size * engine.block_size
    assert again.token_ids == first.token_ids


async def test_a_steered_row_whose_prompt_is_unsteered_reuses_default_blocks(engine):
    ids = chat_ids(engine.tokenizer, "Name four rivers of Europe and the seas they flow into, briefly.")
    await _one(engine, ids, n=2)
    hits = engine.kv_stats()["prefix_hit_tokens"]
    response_only = SteeringSpec((add_op(12, _unit(5), 8.0),), positions=Positions.RESPONSE)
    await _one(engine, ids, n=2, steering=response_only)
    assert engine.kv_stats()["prefix_hit_tokens"] > hits
    hits = engine.kv_stats()["prefix_hit_tokens"]
    await _one(engine, ids, n=2, steering=SteeringSpec((add_op(12, _unit(5), 8.0),)))  # steered prompt
    assert engine.kv_stats()["prefix_hit_tokens"] == hits


async def test_prefill_only_rows_end_after_the_prompt_with_their_captures(engine):
    ids = chat_ids(engine.tokenizer, "Hello there.")
    done = await _one(engine, ids, n=0, captures=(Capture("axis", 10, _unit(9)),))
    assert done.token_ids == [] and done.finish_reason == "length"
    assert len(done.captures["axis"]) == len(ids)


@pytest.fixture(scope="module")
def tight_engine(loaded_model):
    """Ten 16-token blocks, fewer than four rows need together: rows are preempted and recomputed."""
    engine = PersonaEngine(loaded_model, max_batch_size=4, kv_cache_tokens=160)
    engine.start()
    assert engine.wait_ready(120), engine.broken
    yield engine
    engine.stop()


async def test_preempted_rows_are_recomputed_and_equal_their_runs_alone(tight_engine, engine):
    questions = ["Why is the sky blue?", "What is rain?", "Name a big cat.", "What do bees make?"]
    rows = [chat_ids(engine.tokenizer, q) for q in questions]
    blocks = [-(-(len(ids) + 20) // 16) for ids in rows]
    assert max(blocks) <= 10 < sum(blocks)  # each fits alone, together they do not
    alone = [await _one(engine, ids, n=20) for ids in rows]
    together = await asyncio.gather(*(_one(tight_engine, ids, n=20) for ids in rows))
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]
    stats = tight_engine.kv_stats()
    assert stats["preemptions"] >= 1 and stats["kv_blocks_total"] == 10 and stats["kv_block_size"] == 16
    assert stats["kv_blocks_used"] == 0  # every row's blocks went back
