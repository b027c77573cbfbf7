"""The paged engine end to end on the embedded model (CPU): prefix reuse (follow-up turns, STEERED rows whose
prompt is unsteered), preemption when the KV pool runs out, prefill-only rows, KV statistics."""

from __future__ import annotations

import asyncio

import pytest
import torch

from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, RowToken, SamplingParams
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


async def test_rows_leaving_while_a_step_runs_ahead_do_not_disturb_the_others(engine):
    """Decode-only steps launch the next step before streaming their tokens; a row cancelled or stopped by a
    stop string meanwhile leaves with that step in flight, and the others still equal their runs alone."""
    tok = engine.tokenizer
    greedy = SamplingParams(max_new_tokens=40, ignore_eos=True)
    stays = [
        RowRequest(chat_ids(tok, "Name three rivers."), greedy, SteeringSpec((add_op(15, _unit(8) * 40.0, 1.0),))),
        RowRequest(chat_ids(tok, "Name three mountains."), greedy),
    ]
    [full] = await engine.collect(GenerationJob([RowRequest(chat_ids(tok, "Count from 1 to 30."), greedy)]))
    stop = SamplingParams(max_new_tokens=40, stop=(full.text[10:14],))
    stopper = RowRequest(chat_ids(tok, "Count from 1 to 30."), stop)
    alone = [(await engine.collect(GenerationJob([r])))[0] for r in stays]

    async def cancel_after(job: GenerationJob, tokens: int) -> int:
        seen = 0
        async for event in engine.submit(job):
            seen += isinstance(event, RowToken)
            if seen == tokens:
                job.cancel()
                return seen
        return seen

    doomed = GenerationJob([RowRequest(chat_ids(tok, "Tell me a story."), greedy)])
    ahead_before = engine.ahead_launches + engine.chained_launches
    results = await asyncio.gather(
        *(engine.collect(GenerationJob([r])) for r in (stays[0], stopper, stays[1])), cancel_after(doomed, 6)
    )
    assert [results[0][0].token_ids, results[2][0].token_ids] == [a.token_ids for a in alone]
    assert results[1][0].text == full.text[:10] and results[1][0].finish_reason == "stop"
    assert results[3] == 6 and doomed.cancelled
    assert engine.ahead_launches + engine.chained_launches > ahead_before
