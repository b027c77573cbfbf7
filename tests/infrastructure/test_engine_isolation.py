"""Issue 20 on the session engine: one row's numerical failure fails that request only (at prefill and
at decode), failed prefills are counted, and a reader that stalls holds bounded memory."""

from __future__ import annotations

import asyncio

import torch

from infrastructure.engine.job import GenerationJob, JobFailed, RowFinished, RowRequest, RowToken, SamplingParams
from infrastructure.errors import GenerationError
from infrastructure.faults import build_fault
from infrastructure.steering.hooks import our_hooks
from infrastructure.steering.spec import Method, Positions, SteeringOp, SteeringSpec
from tests.helpers import chat_ids

QUESTION = "What is the capital of France?"


def job(ids, n: int = 6, steering: SteeringSpec | None = None, temperature: float = 0.0) -> GenerationJob:
    sampling = SamplingParams(max_new_tokens=n, temperature=temperature, seed=3, ignore_eos=True)
    return GenerationJob([RowRequest(ids, sampling, steering)])


def overflowing(hidden: int, positions: Positions = Positions.ALL) -> SteeringSpec:
    """Steering the request checks would refuse (a scaled vector that overflowed float32): the row's
    residual stream becomes inf, its logits NaN."""
    op = SteeringOp(site=3, method=Method.ADD, vector=torch.full((hidden,), float("inf")))
    return SteeringSpec(ops=(op,), positions=positions)


async def run(engine, jobs: list[GenerationJob]) -> list[list]:
    """Submit every job before the engine takes any (so they share one prefill) and collect each stream."""
    with engine._cv:  # the engine's condition is re-entrant: the inference thread waits until all are queued
        streams = [engine.submit(j) for j in jobs]

    async def drain(stream):
        return [event async for event in stream]

    return await asyncio.gather(*(drain(s) for s in streams))


async def test_an_overflowing_row_fails_alone_at_prefill(engine, loaded_model):
    ids = chat_ids(engine.tokenizer, QUESTION)
    alone = await run(engine, [job(ids)])
    failed_rows = engine.stats["failed_rows"]
    innocent, bad, sampled = await run(
        engine, [job(ids), job(ids, steering=overflowing(loaded_model.hidden_size)), job(ids, temperature=0.8)]
    )
    assert isinstance(bad[-1], JobFailed) and isinstance(bad[-1].error, GenerationError)
    assert "non-finite" in bad[-1].error.message
    assert not any(isinstance(e, RowToken) for e in bad)
    assert isinstance(innocent[-1], RowFinished) and innocent[-1].text == alone[0][-1].text
    assert isinstance(sampled[-1], RowFinished) and sampled[-1].completion_tokens == 6
    assert engine.stats["failed_rows"] == failed_rows + 1
    assert our_hooks(loaded_model.model) == []


async def test_an_overflowing_row_fails_alone_at_decode(engine, loaded_model):
    """Steering only the response: the prompt is fine, the row's first decode step overflows."""
    ids = chat_ids(engine.tokenizer, QUESTION)
    alone = await run(engine, [job(ids, n=8)])
    innocent, bad = await run(
        engine, [job(ids, n=8), job(ids, n=8, steering=overflowing(loaded_model.hidden_size, Positions.RESPONSE))]
    )
    assert isinstance(bad[-1], JobFailed) and "non-finite" in bad[-1].error.message
    assert isinstance(innocent[-1], RowFinished) and innocent[-1].text == alone[0][-1].text


async def test_a_failed_prefill_counts_as_a_failed_batch(engine):
    ids = chat_ids(engine.tokenizer, QUESTION)
    before = engine.stats["failed_batches"]
    engine.fault = build_fault("prefill:1")
    try:
        [events] = await run(engine, [job(ids)])
    finally:
        engine.fault = None
    assert isinstance(events[-1], JobFailed)
    assert engine.stats["failed_batches"] == before + 1


async def test_a_stalled_reader_holds_one_event_per_row(engine):
    """The reader takes nothing until the row has finished: the job's channel then holds the merged token
    event (cumulative text once) and the end, not one event per token."""
    ids = chat_ids(engine.tokenizer, "Tell me a long story about a lighthouse.")
    stalled = job(ids, n=20)
    stream = engine.submit(stalled)
    for _ in range(6000):  # up to 2 min on a busy 2-core machine
        if stalled._queue is not None and any(isinstance(e, RowFinished) for e in stalled._queue._items):
            break
        await asyncio.sleep(0.02)
    assert len(stalled._queue) == 2
    events = [event async for event in stream]
    token, end = events
    assert isinstance(token, RowToken) and isinstance(end, RowFinished)
    assert token.text == token.delta and end.text.startswith(token.text.rstrip()[:20])
    assert end.completion_tokens == 20


async def test_a_reader_far_behind_pauses_its_row_not_the_batch(engine):
    """Back-pressure: a job whose client reads nothing stops decoding once MAX_UNREAD_TOKENS of its tokens wait
    (it keeps its blocks), the other rows go on to the end, and once read it resumes to exactly the text it
    would have had alone."""
    ids = chat_ids(engine.tokenizer, "Tell me a long story about a lighthouse.")
    [alone] = await run(engine, [job(ids, n=24)])
    limit, engine.max_unread_tokens = engine.max_unread_tokens, 4
    try:
        stalled = job(ids, n=24)
        stream = engine.submit(stalled)
        [other] = await run(engine, [job(chat_ids(engine.tokenizer, QUESTION), n=16)])
        assert isinstance(other[-1], RowFinished) and other[-1].completion_tokens == 16
        await asyncio.sleep(0.5)  # the paused row stays paused while nobody reads
        assert 4 < stalled.unread_tokens <= 6  # the limit, plus at most a step in flight and one run ahead
        assert not any(isinstance(e, RowFinished) for e in stalled._queue._items)
        events = [event async for event in stream]
    finally:
        engine.max_unread_tokens = limit
    assert events[-1].text == alone[-1].text and events[-1].completion_tokens == 24
