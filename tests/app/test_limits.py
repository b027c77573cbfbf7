"""Limits checked before any model work: body size, tokens, vectors, layers, queue, rate, CORS."""

from __future__ import annotations

import json

import pytest
import torch

from infrastructure.errors import InvalidRequestError
from infrastructure.steering.resolve import ModelShape, VectorRef, resolve_steering
from infrastructure.storage.traits import TraitStore
from tests.app.support import GREEDY_PROBE, assert_error_shape, client_for

BASELINE = "/api/v1/generate/baseline"


@pytest.fixture(scope="module")
def small_app(make_app):
    return make_app(max_body_bytes=2048, token_limit=40, max_new_tokens_limit=8)


async def test_declared_body_over_the_limit_is_413_before_parsing(small_app, engine):
    steps = engine.stats["steps"]
    body = json.dumps({"prompt": "x" * 4000, "max_tokens": 2}).encode()
    async with client_for(small_app) as c:
        response = await c.post(BASELINE, content=body, headers={"content-type": "application/json"})
    error = assert_error_shape(response, 413, "payload_too_large")
    assert "2048" in error["message"] and error["param"] == "body"
    assert engine.stats["steps"] == steps


async def test_streamed_chunked_body_is_counted(small_app):
    async def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    async with client_for(small_app) as c:
        response = await c.post(BASELINE, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    error = assert_error_shape(response, 413, "payload_too_large")
    assert "MAX_BODY_BYTES" in error["message"] and error["param"] == "body"  # as the declared-length 413


async def test_small_chunked_body_passes(small_app):
    async def chunks():
        yield json.dumps({"prompt": "", "max_tokens": 2}).encode()

    async with client_for(small_app) as c:
        response = await c.post(BASELINE, content=chunks(), headers={"content-type": "application/json"})
    assert assert_error_shape(response, 422)["param"] == "prompt"  # reached validation, not the size limit


async def test_prompt_and_new_token_limits(small_app):
    async with client_for(small_app) as c:
        long_prompt = await c.post(BASELINE, json={"prompt": "word " * 60, "max_tokens": 2})
        many_tokens = await c.post(BASELINE, json={"prompt": "hi", "max_tokens": 9})
    error = assert_error_shape(long_prompt, 400, "token_limit")
    assert error["param"] == "prompt" and "TOKEN_LIMIT" in error["message"]
    error = assert_error_shape(many_tokens, 400)
    assert error["param"] == "max_tokens" and "8" in error["message"]


def test_distinct_layers_limit_names_vectors():
    shape = ModelShape(hidden_size=4, n_layers=6)
    refs = [VectorRef(param=f"vectors.{i}", scale=1.0, values=[1.0, 0, 0, 0], hook=i) for i in range(3)]
    spec = resolve_steering(refs, TraitStore(), shape, max_layers=3)
    assert sorted(op.site for op in spec.ops) == [0, 1, 2]
    same_layer = [VectorRef(param=f"vectors.{i}", scale=1.0, values=[1.0, 0, 0, 0], hook=1) for i in range(5)]
    assert len(resolve_steering(same_layer, TraitStore(), shape, max_layers=1).ops) == 5
    with pytest.raises(InvalidRequestError) as info:
        resolve_steering(refs, TraitStore(), shape, max_layers=2)
    assert info.value.param == "vectors" and "MAX_LAYERS" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        resolve_steering(refs, TraitStore(), shape, max_vectors=2)
    assert info.value.param == "vectors" and "MAX_VECTORS" in info.value.message
    assert torch.equal(spec.ops[0].vector, torch.tensor([1.0, 0, 0, 0]))


async def test_full_queue_is_503_with_retry_after(client, engine):
    steps = engine.stats["steps"]
    engine.max_queue = 0  # nothing may wait: the next submit is refused at once
    try:
        response = await client.post(BASELINE, json=GREEDY_PROBE)
    finally:
        engine.max_queue = 256
    error = assert_error_shape(response, 503, "queue_full")
    assert "MAX_QUEUE" in error["message"]
    assert int(response.headers["retry-after"]) >= 1
    assert engine.stats["steps"] == steps


async def test_rate_limit_429_in_the_one_shape(make_app):
    app = make_app(rate_limit="3/minute")
    async with client_for(app) as c:
        answers = [await c.get("/status") for _ in range(4)]
        health = [await c.get("/health") for _ in range(5)]
        other = await c.get("/api/v1/traits/none")  # the same client: limits count every route
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    error = assert_error_shape(answers[3], 429, "rate_limited")
    assert "3 per 1 minute" in error["message"]
    assert int(answers[3].headers["retry-after"]) > 0
    assert answers[3].headers["x-ratelimit-limit"] == "3"
    assert all(r.status_code == 200 for r in health)  # probes are never throttled
    assert other.status_code == 429


def test_malformed_rate_limit_fails_at_start_up():
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError):
        Settings(_env_file=None, rate_limit="lots per fortnight")


async def test_rate_limit_off_by_default(client):
    codes = {(await client.get("/status")).status_code for _ in range(10)}
    assert codes == {200}


async def test_cors_preflight_and_origin_echo(make_app):
    app = make_app(cors_origins=["https://allowed.example"], SECRET="k")
    async with client_for(app) as c:
        preflight = await c.options(
            BASELINE,
            headers={
                "Origin": "https://allowed.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-secret-key,content-type",
            },
        )
        denied = await c.options(
            BASELINE, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        unauth = await c.get("/status", headers={"Origin": "https://allowed.example"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://allowed.example"
    assert "x-secret-key" in preflight.headers["access-control-allow-headers"].lower()
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
    assert_error_shape(unauth, 401)  # CORS wraps auth, so browsers can read the 401
    assert unauth.headers["access-control-allow-origin"] == "https://allowed.example"


async def test_distinct_layers_limit_over_http(make_app, engine):
    steps = engine.stats["steps"]
    vector = [0.01] * 576
    body = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "types": ["STEERED"],
        "n_completion_tokens": 2,
        "vectors": [
            {"hook": f"blocks.{k}.hook_resid_post", "strength": 1.0, "steering_vector": vector} for k in (2, 5)
        ],
    }
    chat = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "messages": body["prompt"], "max_tokens": 2}
    chat["steering"] = {"vectors": [{"vector": vector, "scale": 1.0, "layer": k} for k in (2, 5)]}
    async with client_for(make_app(max_layers=1)) as c:
        steer = await c.post("/v1/steer/completion-chat", json=body)
        openai = await c.post("/v1/chat/completions", json=chat)
    for response in (steer, openai):
        error = assert_error_shape(response, 400)
        assert "MAX_LAYERS" in error["message"]
    assert assert_error_shape(steer, 400)["param"] == "vectors"
    assert engine.stats["steps"] == steps
