"""The static-shape decode path (DECODE_MODE=static: preallocated slots, the layout CUDA graphs replay) on the
CPU: every row's greedy output equals the dynamic engine's, through joins, shifts, holes and compaction."""

from __future__ import annotations

import asyncio

import pytest
import torch

from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, RowToken, SamplingParams
from infrastructure.steering.hooks import our_hooks
from infrastructure.steering.spec import Capture, SteeringSpec, add_op, cap_op, ortho_op
from tests.helpers import chat_ids

LAYER = 15
MORE = "Mention the weather, the food, the people you meet, the animals you see, and how you feel each evening."


def _vec(seed: int, norm: float = 40.0) -> torch.Tensor:
    v = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@pytest.fixture(scope="module")
def static_engine(loaded_model):
    """A small static engine: 4 slots, 112 columns (so long runs must compact)."""
    engine = PersonaEngine(loaded_model, max_batch_size=4, decode="static", static_len=112)
    engine.start()
    assert engine.wait_ready(120), engine.broken
    yield engine
    engine.stop()


async def _alone(engine, row: RowRequest):
    [done] = await engine.collect(GenerationJob([row]))
    return done


def test_static_mode_caps_the_context_and_uses_slots(static_engine, engine):
    assert static_engine.decode_mode == "static" and engine.decode_mode == "paged"  # paged is the default engine
    assert static_engine.context_len == 112
    batch = static_engine._batch
    assert batch.capacity == 4 and batch.keys[0].shape[0] == 4 and batch.keys[0].shape[2] == 112
    assert batch.batch_buckets == [1, 2, 4] and batch.length_buckets == [112]


async def test_greedy_answer_and_steering_match_the_dynamic_engine(static_engine, engine):
    ids = chat_ids(engine.tokenizer, "What is the capital of France?")
    done = await _alone(static_engine, RowRequest(ids, SamplingParams(max_new_tokens=24)))
    assert done.text == "The capital of France is Paris."
    ortho = ortho_op(LAYER + 1, _vec(3), 4.0)  # ORTHOGONAL_DECOMP's buffers in the static tables too
    spec = SteeringSpec((add_op(LAYER, _vec(1, 120.0), 1.0), ortho, cap_op(LAYER + 2, _vec(2), 0.5)))
    caps = (Capture("axis", LAYER + 2, _vec(2) / 40.0),)
    ids = chat_ids(engine.tokenizer, "Tell me about the ocean.")
    row = RowRequest(ids, SamplingParams(max_new_tokens=24), spec, caps)
    static, dynamic = await _alone(static_engine, row), await _alone(engine, row)
    assert static.token_ids == dynamic.token_ids
    assert len(static.captures["axis"]) == len(dynamic.captures["axis"]) == row_len(row) + 23
    assert torch.allclose(torch.tensor(static.captures["axis"]), torch.tensor(dynamic.captures["axis"]), atol=1e-3)
    assert max(static.captures["axis"][-23:]) <= 0.5 + 1e-3  # the cap holds on decode steps too
    assert our_hooks(engine.model) == []


def row_len(row: RowRequest) -> int:
    return len(row.prompt_ids)


async def test_rows_joining_and_leaving_at_different_steps_equal_their_runs_alone(static_engine, engine):
    """A long row runs while others join mid-way (a wider prefill shifts it right), a middle row leaves first
    (the tail row moves into its slot) and the write column passes the end (unused columns are compacted)."""
    tok = engine.tokenizer
    long_row = RowRequest(chat_ids(tok, "Count from 1 to 50."), SamplingParams(max_new_tokens=70, ignore_eos=True))
    joiners = [
        RowRequest(
            chat_ids(tok, "Describe a long journey across the mountains, the rivers and the sea, in detail. " + MORE),
            SamplingParams(max_new_tokens=8, ignore_eos=True),
            SteeringSpec((add_op(LAYER, _vec(5), 1.0),)),
        ),
        RowRequest(
            chat_ids(tok, "Name a colour."),
            SamplingParams(max_new_tokens=60, ignore_eos=True),
            SteeringSpec((add_op(LAYER - 3, _vec(6, 80.0), 1.0),)),
        ),
    ]
    alone = [await _alone(engine, r) for r in (long_row, *joiners)]
    moves = dict(static_engine._batch.moves)

    async def run_long():
        started = False
        done = None
        async for event in static_engine.submit(GenerationJob([long_row])):
            if isinstance(event, RowToken) and not started and len(event.text) > 20:
                started = True
                joined.set()
            elif not isinstance(event, RowToken):
                done = event
        return done

    joined = asyncio.Event()
    long_task = asyncio.create_task(run_long())
    await joined.wait()
    together = await asyncio.gather(*(static_engine.collect(GenerationJob([r])) for r in joiners))
    long_done = await long_task
    assert [long_done.token_ids, *(t[0].token_ids for t in together)] == [a.token_ids for a in alone]
    assert static_engine.stats["max_batch"] >= 3
    after = static_engine._batch.moves
    assert all(after[k] > moves[k] for k in ("shifts", "compactions", "moved_rows")), (moves, after)
    for _ in range(100):  # the last row's slot is freed right after its final event went out
        if static_engine._batch.n == 0:
            break
        await asyncio.sleep(0.01)
    assert static_engine._batch.n == 0
    assert our_hooks(engine.model) == []


async def test_prompts_longer_than_the_static_cache_are_refused(static_engine):
    from infrastructure.errors import TokenLimitError

    with pytest.raises(TokenLimitError):
        static_engine.check_prompt(112)


async def test_rows_leaving_while_a_step_runs_ahead_do_not_disturb_the_others(static_engine, engine):
    """The next step is launched before a step's tokens are processed; a row cancelled or stopped by a stop
    string meanwhile leaves with that step in flight, and the others' outputs stay in the right rows."""
    tok = engine.tokenizer
    greedy = SamplingParams(max_new_tokens=40, ignore_eos=True)
    stays = [
        RowRequest(chat_ids(tok, "Name three rivers."), greedy, SteeringSpec((add_op(LAYER, _vec(8), 1.0),))),
        RowRequest(chat_ids(tok, "Name three mountains."), greedy),
    ]
    full = await _alone(engine, RowRequest(chat_ids(tok, "Count from 1 to 30."), greedy))
    stopper = RowRequest(
        chat_ids(tok, "Count from 1 to 30."), SamplingParams(max_new_tokens=40, stop=(full.text[10:14],))
    )
    alone = [await _alone(engine, r) for r in stays]

    async def cancel_after(job: GenerationJob, tokens: int):
        seen = 0
        async for event in static_engine.submit(job):
            seen += isinstance(event, RowToken)
            if seen == tokens:
                job.cancel()
                return seen

    doomed = GenerationJob([RowRequest(chat_ids(tok, "Tell me a story."), greedy)])
    left_before = static_engine._batch.moves["left_in_flight"]
    results = await asyncio.gather(
        *(static_engine.collect(GenerationJob([r])) for r in (stays[0], stopper, stays[1])), cancel_after(doomed, 6)
    )
    assert [results[0][0].token_ids, results[2][0].token_ids] == [a.token_ids for a in alone]
    assert results[1][0].text == full.text[:10] and results[1][0].finish_reason == "stop"
    assert results[3] == 6 and doomed.cancelled
    assert static_engine._batch.moves["left_in_flight"] > left_before
