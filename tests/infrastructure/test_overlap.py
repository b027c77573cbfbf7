"""Overlapped decode steps (OVERLAP_SCHEDULE, overlap.py) on the embedded model (CPU): the next step launched on
the device tokens of the last one gives exactly what one-step-at-a-time gives, for steered rows whose steering
skips special tokens, captures, rows that stop early, and a batch whose rows leave mid-chain."""

from __future__ import annotations

import asyncio

import torch

from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.engine.overlap import Feed
from infrastructure.steering.spec import Capture, SteeringSpec, add_op
from tests.helpers import chat_ids


def _unit(seed: int, hidden: int = 576) -> torch.Tensor:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_a_feed_clears_the_bits_of_checked_rows_whose_token_is_special():
    feed = Feed(torch.tensor([5, 2, 2, 7]), torch.tensor([True, True, False, True]), torch.tensor([1, 2]))
    assert feed.mask(torch.tensor([True, True, True, False])).tolist() == [True, False, True, False]
    unchecked = Feed(torch.tensor([2]), None, torch.tensor([2]))
    assert unchecked.mask(torch.tensor([True])).tolist() == [True]


def _rows(tok) -> list[RowRequest]:
    # steering that skips special tokens (completion-chat's default): past <|im_end|> (ignore_eos) the bit of
    # each position depends on the token, which a chained step computes on the device
    skips = SteeringSpec((add_op(12, _unit(3) * 30.0, 1.0),), steer_special_tokens=False)
    keeps = SteeringSpec((add_op(12, _unit(3) * 30.0, 1.0),), steer_special_tokens=True)
    axis = (Capture("axis", 20, _unit(4)),)
    run_on = SamplingParams(max_new_tokens=36, ignore_eos=True)
    return [
        RowRequest(chat_ids(tok, "Say hi."), run_on, skips, axis),
        RowRequest(chat_ids(tok, "Say hi."), run_on, keeps, axis),
        RowRequest(chat_ids(tok, "What is the capital of France?"), SamplingParams(max_new_tokens=36)),  # stops at EOS
        RowRequest(chat_ids(tok, "Name a colour."), run_on, None, axis),
    ]


async def _together(engine, rows):
    done = await asyncio.gather(*(engine.collect(GenerationJob([r])) for r in rows))
    return [d[0] for d in done]


async def test_chained_steps_equal_one_step_at_a_time(engine):
    rows = _rows(engine.tokenizer)
    before = engine.chained_launches
    overlapped = await _together(engine, rows)
    assert engine.chained_launches > before
    engine.overlap = False  # OVERLAP_SCHEDULE=off: the same engine, every step waits for the last one's tokens
    try:
        before = engine.chained_launches
        plain = await _together(engine, rows)
        assert engine.chained_launches == before
    finally:
        engine.overlap = True
    for a, b in zip(overlapped, plain):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.captures.keys() == b.captures.keys()
        for name in a.captures:
            assert torch.allclose(torch.tensor(a.captures[name]), torch.tensor(b.captures[name]), atol=1e-5)
    special = set(engine.tokenizer.all_special_ids)
    assert any(t in special for t in plain[0].token_ids[:-1])  # a special token mid-row: its bit was tested
    assert plain[0].token_ids != plain[1].token_ids  # ... and steering it or not changes the row
    assert plain[2].finish_reason == "stop" and len(plain[2].token_ids) < 36  # it left while a step was chained
    assert len(plain[0].captures["axis"]) == len(plain[0].token_ids) + len(rows[0].prompt_ids) - 1


async def test_sampled_rows_do_not_chain(engine):
    hot = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    before = engine.chained_launches
    [done] = await engine.collect(GenerationJob([RowRequest(chat_ids(engine.tokenizer, "Hello."), hot)]))
    assert len(done.token_ids) == 12 and engine.chained_launches == before
