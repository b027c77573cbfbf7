"""Faults inside a batch fail only that batch's jobs, leave no hook, and do not change later output.

Faults are injected through `engine.fault` on the session engine and always removed in `finally`."""

from __future__ import annotations

import asyncio

import pytest
import torch

from infrastructure.engine.job import GenerationJob, JobFailed, RowFinished, RowRequest, RowToken, SamplingParams
from infrastructure.errors import GenerationError
from infrastructure.faults import FaultInjector, InjectedFault, build_fault, parse_faults
from infrastructure.steering.hooks import our_hooks
from infrastructure.steering.spec import SteeringSpec, add_op
from tests.helpers import chat_ids

QUESTION = "What is the capital of France?"


def greedy(ids, n: int = 5, steering: SteeringSpec | None = None) -> GenerationJob:
    return GenerationJob([RowRequest(ids, SamplingParams(max_new_tokens=n), steering)])


def steered(hidden: int) -> SteeringSpec:
    gen = torch.Generator().manual_seed(0)
    return SteeringSpec(ops=(add_op(10, torch.randn(hidden, generator=gen), 4.0),))


async def outcome(engine, job: GenerationJob) -> RowFinished | JobFailed:
    async for event in engine.submit(job):
        if isinstance(event, (RowFinished, JobFailed)):
            return event
    raise AssertionError("the stream ended without a final event")


async def settles(condition, seconds: float = 10.0) -> bool:
    """Poll a condition the inference thread makes true shortly after the last event is delivered."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


class MidForwardFault:
    """A fault that fires *inside* the nth forward of a phase, while the steering hooks are attached:
    it arms a plain (non-steering) hook on the last decoder layer that raises once and removes itself."""

    def __init__(self, model, phase: str, nth: int, exc: BaseException) -> None:
        self.layer = model.model.layers[-1]
        self.phase, self.nth, self.exc, self.seen, self.hooks_during = phase, nth, exc, 0, None
        self.boom_removed = False

    def __call__(self, phase: str) -> None:
        if phase != self.phase:
            return
        self.seen += 1
        if self.seen == self.nth:
            handle = None

            def boom(module, args, output):
                self.hooks_during = len(our_hooks(module_root))
                handle.remove()
                self.boom_removed = handle.id not in module._forward_hooks
                raise self.exc

            handle = self.layer.register_forward_hook(boom)


module_root = None


@pytest.mark.parametrize(
    "exc", [RuntimeError("boom inside the forward"), torch.OutOfMemoryError("CUDA out of memory (injected)")]
)
async def test_fault_mid_forward_fails_the_batch_leaves_no_hook_and_baseline_is_unchanged(engine, loaded_model, exc):
    global module_root
    module_root = loaded_model.model
    ids = chat_ids(engine.tokenizer, QUESTION)
    pristine = await outcome(engine, greedy(ids))
    assert isinstance(pristine, RowFinished) and pristine.text
    fault = MidForwardFault(loaded_model.model, "decode", 2, exc)
    engine.fault = fault
    failed_before = engine.stats["failed_batches"]
    try:
        a, b = await asyncio.gather(
            outcome(engine, greedy(ids, steering=steered(loaded_model.hidden_size))), outcome(engine, greedy(ids))
        )
    finally:
        engine.fault = None
    assert fault.hooks_during and fault.hooks_during >= 1  # the steering hook was attached when it broke
    for event in (a, b):
        assert isinstance(event, JobFailed) and isinstance(event.error, GenerationError)
        assert type(exc).__name__ in event.error.message
    assert engine.stats["failed_batches"] == failed_before + 1
    assert our_hooks(loaded_model.model) == []
    assert fault.boom_removed  # the armed plain hook removed itself too
    after = await outcome(engine, greedy(ids))
    assert after.text == pristine.text and after.token_ids == pristine.token_ids
    assert await settles(lambda: engine.active_requests == 0) and engine.broken is None


async def test_prefill_fault_fails_only_the_new_job_while_a_running_one_finishes(engine, loaded_model):
    ids = chat_ids(engine.tokenizer, QUESTION)
    other = chat_ids(engine.tokenizer, "Name a colour.")
    pristine = await outcome(engine, greedy(ids, n=8))
    running = engine.submit(greedy(ids, n=8))
    first = await anext(running)
    assert isinstance(first, RowToken)
    engine.fault = build_fault("prefill:1")
    try:
        newcomer = await outcome(engine, greedy(other, n=4))
        rest = [event async for event in running]
    finally:
        engine.fault = None
    assert isinstance(newcomer, JobFailed) and "InjectedFault" in newcomer.error.message
    finished = rest[-1]
    assert isinstance(finished, RowFinished) and finished.text == pristine.text
    assert our_hooks(loaded_model.model) == []


async def test_decode_fault_from_the_setting_fires_once(engine, loaded_model):
    ids = chat_ids(engine.tokenizer, QUESTION)
    pristine = await outcome(engine, greedy(ids, n=4))
    injector = build_fault("decode:3:oom")
    engine.fault = injector
    try:
        failed = await outcome(engine, greedy(ids, n=4))
        again = await outcome(engine, greedy(ids, n=4))
    finally:
        engine.fault = None
    assert isinstance(failed, JobFailed) and "OutOfMemoryError" in failed.error.message
    assert injector.fired == 1 and injector.counts["decode"] >= 3
    assert isinstance(again, RowFinished) and again.text == pristine.text
    assert our_hooks(loaded_model.model) == []


def test_fault_rules_parse_and_fire_on_the_nth_forward_only():
    assert build_fault("") is None
    rules = parse_faults("decode:2, prefill:1:oom")
    assert [(r.phase, r.nth, r.oom) for r in rules] == [("decode", 2, False), ("prefill", 1, True)]
    injector = FaultInjector(rules)
    with pytest.raises(torch.OutOfMemoryError):
        injector("prefill")
    injector("decode")
    with pytest.raises(InjectedFault):
        injector("decode")
    for _ in range(5):
        injector("decode")
        injector("prefill")
    assert injector.fired == 2
    for bad in ("decode", "decode:0", "encode:1", "decode:1:segfault"):
        with pytest.raises(ValueError):
            parse_faults(bad)
