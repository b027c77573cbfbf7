"""Seed 002's routes over HTTP with the real model: generate, baseline, traits, health, status, errors."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from infrastructure.storage.traits import load_traits

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


def _write_trait(folder, name, seed, norm=60.0, hidden=576, model=MODEL):
    vec = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    vec = vec / vec.norm() * norm
    body = {
        "trait_name": name,
        "model_name": model,
        "vectors": {str(layer): vec.tolist() for layer in (10, 15, 20)},
        "metadata": {"recommended_layer": 15, "description": f"synthetic trait {name}"},
    }
    (folder / f"{name}.json").write_text(json.dumps(body))


@pytest.fixture(scope="module")
def synthetic_traits(runtime, tmp_path_factory):
    """Eight random-direction traits written in seed 002's format and loaded through the real loader."""
    folder = tmp_path_factory.mktemp("vectors")
    for i in range(8):
        _write_trait(folder, f"synthetic_{i}", seed=100 + i)
    _write_trait(folder, "wrong_size", seed=1, hidden=64)
    _write_trait(folder, "other_model", seed=2, model="Qwen/Qwen2.5-7B-Instruct")
    store = load_traits(folder, folder, {MODEL}, 576, 30)
    for trait in store.traits.values():
        runtime.traits.add(trait)
    return store


def test_loader_skips_what_does_not_fit(synthetic_traits):
    assert sorted(synthetic_traits.traits) == [f"synthetic_{i}" for i in range(8)]
    reasons = {k.rsplit("/", 1)[-1]: v for k, v in synthetic_traits.skipped.items()}
    assert "hidden size is 576" in reasons["wrong_size.json"]
    assert "Qwen/Qwen2.5-7B-Instruct" in reasons["other_model.json"]


async def test_health_and_status(client, synthetic_traits):
    assert (await client.get("/health")).json() == {"status": "ok"}
    status = (await client.get("/status")).json()
    assert status["model"] == MODEL and status["hidden_size"] == 576 and status["layers"] == 30
    assert status["devices"] == ["cpu"] and status["dtype"] == "float32" and status["quantization"] == "none"
    assert "synthetic_3" in status["traits"]
    assert status["queue_depth"] == 0 and status["uptime_s"] >= 0


async def test_baseline_greedy_answers_paris(client):
    r = await client.post("/api/v1/generate/baseline", json={"prompt": QUESTION, "temperature": 0})
    body = r.json()
    assert r.status_code == 200
    assert body["text"] == "The capital of France is Paris."
    assert body["trait"] is None and body["model"] == MODEL and body["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] > 10


async def test_generate_scalar_zero_equals_baseline_with_same_seed(client, synthetic_traits):
    common = {"prompt": "Write one sentence about dogs.", "temperature": 0.9, "seed": 7, "max_tokens": 24}
    base = (await client.post("/api/v1/generate/baseline", json=common)).json()
    zero = (await client.post("/api/v1/generate", json=common | {"trait": "synthetic_0", "scalar": 0.0})).json()
    steered = (await client.post("/api/v1/generate", json=common | {"trait": "synthetic_0", "scalar": 2.0})).json()
    assert zero["text"] == base["text"]
    assert steered["text"] != base["text"]
    assert (steered["trait"], steered["scalar"], steered["layer"]) == ("synthetic_0", 2.0, 15)


async def test_several_traits_at_once(client, synthetic_traits):
    body = {
        "prompt": QUESTION,
        "temperature": 0,
        "max_tokens": 16,
        "traits": [{"trait": "synthetic_1", "scalar": 1.5}, {"trait": "synthetic_2", "scalar": -1.5, "layer": 10}],
    }
    r = (await client.post("/api/v1/generate", json=body)).json()
    assert r["trait"] is None
    assert r["traits"] == [
        {"trait": "synthetic_1", "scalar": 1.5, "layer": 15},
        {"trait": "synthetic_2", "scalar": -1.5, "layer": 10},
    ]


async def test_eight_concurrent_requests_equal_each_alone(client, synthetic_traits):
    bodies = [
        {
            "prompt": f"Tell me a fact about the number {i}.",
            "trait": f"synthetic_{i}",
            "scalar": 1.5,
            "temperature": 0,
            "max_tokens": 20,
        }
        for i in range(8)
    ]
    alone = [(await client.post("/api/v1/generate", json=b)).json()["text"] for b in bodies]
    together = await asyncio.gather(*(client.post("/api/v1/generate", json=b) for b in bodies))
    assert [r.json()["text"] for r in together] == alone
    assert len(set(alone)) == 8


async def test_traits_listing_and_detail(client, synthetic_traits):
    listed = {t["name"]: t for t in (await client.get("/api/v1/traits")).json()["traits"]}
    assert listed["synthetic_4"] == {
        "name": "synthetic_4",
        "description": "synthetic trait synthetic_4",
        "layers": [10, 15, 20],
        "default_layer": 15,
        "model": MODEL,
        "recommended_scalar": None,  # the synthetic trait records no extraction range
        "recommended_scalar_range": None,
    }
    detail = (await client.get("/api/v1/traits/synthetic_4")).json()
    assert detail["norms"] == {"10": 60.0, "15": 60.0, "20": 60.0}
    missing = await client.get("/api/v1/traits/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"


BAD = [
    ({"prompt": QUESTION, "trait": "nope", "scalar": 1}, 404, "trait"),
    ({"prompt": QUESTION, "trait": "synthetic_0", "scalar": 1, "layer": 3}, 400, "layer"),
    ({"prompt": QUESTION, "trait": "synthetic_0", "scalar": 1, "layer": 31}, 400, "layer"),
    ({"prompt": QUESTION, "trait": "synthetic_0", "scalar": 1, "max_tokens": -1}, 422, "max_tokens"),
    ({"prompt": QUESTION, "trait": "synthetic_0", "scalar": 1, "max_tokens": 10**6}, 400, "max_tokens"),
    ({"prompt": QUESTION, "trait": "synthetic_0"}, 422, None),
    ({"trait": "synthetic_0", "scalar": 1}, 422, "prompt"),
    ({"prompt": "", "trait": "synthetic_0", "scalar": 1}, 422, "prompt"),
    ({"prompt": QUESTION, "trait": "synthetic_0", "scalar": "big"}, 422, "scalar"),
    ({"prompt": QUESTION, "trait": "synthetic_0", "scalar": 1, "strenght": 2}, 422, "strenght"),
    ({"prompt": QUESTION, "trait": "synthetic_0", "scalar": 1, "temperature": -0.5}, 422, "temperature"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
async def test_bad_input_gets_4xx_in_the_error_shape(client, synthetic_traits, body, status, param):
    r = await client.post("/api/v1/generate", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) <= {"type", "message", "param"} and error["message"]
    assert error.get("param") == param


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "x", "trait": ',
        '{"prompt": "x", "trait": "synthetic_0", "scalar": NaN}',
        '{"prompt": "x", "trait": "synthetic_0", "scalar": Infinity}',
        "[1, 2]",
    ],
)
async def test_malformed_and_non_finite_json(client, synthetic_traits, raw):
    r = await client.post("/api/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert r.json()["error"]["type"] in {"invalid_json", "validation_error"}
    probe = await client.post("/api/v1/generate/baseline", json={"prompt": QUESTION, "temperature": 0})
    assert probe.json()["text"] == "The capital of France is Paris."
