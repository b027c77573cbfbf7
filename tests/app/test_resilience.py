"""Cancellation, time budgets, faults through the FAULT_INJECTION setting, a broken engine in
/health, and graceful shutdown of a (separate, small) engine."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from app.factory import create_app
from app.runtime import Runtime
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, JobFailed, RowFinished, RowRequest, RowToken, SamplingParams
from infrastructure.errors import EngineUnavailableError, RequestTimeoutError
from infrastructure.steering.hooks import our_hooks
from tests.app.support import GREEDY_PROBE, assert_error_shape, client_for, settles
from tests.helpers import chat_ids

BASELINE = "/api/v1/generate/baseline"


def job(engine, n: int, timeout_s: float | None = None) -> GenerationJob:
    ids = chat_ids(engine.tokenizer, "Tell me a long story about a lighthouse.")
    return GenerationJob([RowRequest(ids, SamplingParams(max_new_tokens=n, ignore_eos=True))], timeout_s=timeout_s)


async def test_abandoned_stream_frees_its_rows_at_the_next_step(engine):
    stream = engine.submit(job(engine, 200))
    events = [await anext(stream), await anext(stream)]
    assert all(isinstance(e, RowToken) for e in events) and engine.active_requests == 1
    tokens_then = engine.stats["tokens"]
    await stream.aclose()  # what a disconnecting client's response generator does
    assert await settles(lambda: engine.active_requests == 0, 5.0)
    assert engine.stats["tokens"] - tokens_then < 20  # dropped long before its 200 tokens


async def test_time_budget_ends_with_a_timeout(engine, make_app):
    stream = engine.submit(job(engine, 500, timeout_s=0.3))
    events = [event async for event in stream]
    assert isinstance(events[-1], JobFailed) and isinstance(events[-1].error, RequestTimeoutError)
    assert not any(isinstance(e, RowFinished) for e in events)
    assert await settles(lambda: engine.active_requests == 0)
    async with client_for(make_app(request_timeout_s=0.001)) as c:
        response = await c.post(BASELINE, json=GREEDY_PROBE)
    assert "time budget" in assert_error_shape(response, 504, "timeout")["message"]


async def test_fault_setting_fails_that_request_only_and_leaves_no_hook(engine, loaded_model, make_app, client):
    pristine = (await client.post(BASELINE, json=GREEDY_PROBE)).json()["text"]
    try:
        app = make_app(fault_injection="decode:2")
        async with client_for(app) as c:
            failed = await c.post(BASELINE, json=GREEDY_PROBE)
            status = (await c.get("/status")).json()
            health = await c.get("/health")
            after = await c.post(BASELINE, json=GREEDY_PROBE)
    finally:
        engine.fault = None
    error = assert_error_shape(failed, 500, "generation_error")
    assert "InjectedFault" in error["message"] and "Traceback" not in failed.text
    assert status["hooks_attached"] == 0 and status["status"] == "ok"
    assert health.json() == {"status": "ok"}
    assert after.status_code == 200 and after.json()["text"] == pristine
    assert our_hooks(loaded_model.model) == []


async def test_fault_after_the_stream_began_is_an_error_frame(engine, make_app, app):
    if "/v1/steer/completion-chat" not in app.openapi()["paths"]:
        pytest.skip("no completion-chat route")  # pragma: no cover
    body = {"prompt": [{"role": "user", "content": "Hi"}], "temperature": 0, "n_completion_tokens": 6, "stream": True}
    try:
        async with client_for(make_app(fault_injection="decode:3")) as c:
            response = await c.post("/v1/steer/completion-chat", json=body)
    finally:
        engine.fault = None
    frames = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200 and len(frames) >= 2
    assert "outputs" in frames[0]
    last = frames[-1]  # the text so far plus the error, so the webapp's `outputs.find(...)` still finds its type
    assert isinstance(last["error"], str) and last["type"] == "generation_error"
    assert last["outputs"] == frames[-2]["outputs"] and last["input"] == frames[-2]["input"]


async def test_health_reports_a_broken_engine_as_503(settings):
    failed_load = Runtime(settings, load_error="ModelLoadError: no weights at /nowhere")
    broken = Runtime(settings, engine=SimpleNamespace(broken="RuntimeError: inference loop died", ready=True))
    for runtime, detail in ((failed_load, "no weights"), (broken, "inference loop died")):
        async with client_for(create_app(settings, runtime=runtime)) as c:
            health = await c.get("/health")
            generate = await c.post(BASELINE, json=GREEDY_PROBE)
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert detail in health.json()["detail"]
        assert detail in assert_error_shape(generate, 503, "engine_unavailable")["message"]


async def test_graceful_shutdown_drains_then_refuses(engine, loaded_model, make_runtime):
    assert await settles(lambda: engine.active_requests == 0 and engine.queue_depth == 0)
    small = PersonaEngine(loaded_model, max_batch_size=4)  # the session engine is idle meanwhile
    small.start()
    assert small.wait_ready(120), small.broken
    runtime = make_runtime(engine_override=small)
    stream = small.submit(job(small, 6))
    first = await anext(stream)
    await asyncio.to_thread(small.stop, 60)  # drains: the running job finishes
    rest = [event async for event in stream]
    assert isinstance(first, RowToken) and isinstance(rest[-1], RowFinished)
    assert rest[-1].completion_tokens == 6 and rest[-1].finish_reason == "length"
    with pytest.raises(EngineUnavailableError, match="shutting down"):
        small.submit(job(small, 2))
    async with client_for(create_app(runtime=runtime)) as c:
        refused = await c.post(BASELINE, json=GREEDY_PROBE)
        health = await c.get("/health")
    assert "shutting down" in assert_error_shape(refused, 503, "engine_unavailable")["message"]
    assert health.status_code == 503 and health.json() == {"status": "stopping"}


async def test_shutdown_past_its_grace_period_ends_streams_with_an_error(engine, loaded_model):
    assert await settles(lambda: engine.active_requests == 0 and engine.queue_depth == 0)
    small = PersonaEngine(loaded_model, max_batch_size=4)
    small.start()
    assert small.wait_ready(120), small.broken
    stream = small.submit(job(small, 500))
    first = await anext(stream)
    await asyncio.to_thread(small.stop, 0)  # no grace: abort
    rest = [event async for event in stream]
    assert isinstance(first, RowToken)
    assert isinstance(rest[-1], JobFailed) and isinstance(rest[-1].error, EngineUnavailableError)
    assert sum(isinstance(e, RowToken) for e in rest) < 499
    assert our_hooks(loaded_model.model) == []
