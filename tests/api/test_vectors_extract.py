"""POST /api/v1/vectors/extract end to end on the embedded model: the vector is the difference of mean
answer activations of the fit split, chosen on the validation split, registered, usable by name; SSE
progress; clear 4xx for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infrastructure.persona import activations as act
from infrastructure.persona.contrastive import split

PAIRS = json.loads((Path(__file__).resolve().parents[2] / "data/prompts/sarcasm_trait.json").read_text())[
    "contrastive_pairs"
][:8]
LAYERS = [6, 13]


def _sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_extract_registers_the_fitted_vector(client, loaded_model, engine):
    body = {"name": "sarcasm-x", "description": "test", "pairs": PAIRS, "layers": LAYERS}
    r = await client.post("/api/v1/vectors/extract", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    layer = out["recommended_layer"]
    assert layer in LAYERS and out["vector"]["default_layer"] == layer
    assert out["split"]["fit"] == {"positive": 6, "negative": 6} and out["split"]["validation"]["positive"] == 2
    val = out["validation"]
    assert [s["layer"] for s in val["layers"]] == LAYERS and val["chosen_layer"] == layer
    best = max(val["layers"], key=lambda s: s["rise_per_unit"])
    assert best["layer"] == layer and best["margin_plus"] > best["margin_minus"]  # sarcasm pairs steer
    top = next(p for p in val["range"] if p["fraction"] == val["top_fraction"])
    assert out["recommended_scalar"] > 0 and out["recommended_scalar"] == pytest.approx(top["scalar"], abs=1e-3)
    assert out["recommended_scalar_range"] == [-out["recommended_scalar"], out["recommended_scalar"]]

    # the registered floats are the difference of mean answer activations over the fit split, by a direct forward
    tok = loaded_model.tokenizer
    fit, _ = split(len(PAIRS))
    prompts = [act.chat_ids(tok, PAIRS[i]["question"]) for i in fit]
    spans = {
        side: act.response_activations(
            loaded_model.model,
            prompts,
            [tok(PAIRS[i][side], add_special_tokens=False)["input_ids"] for i in fit],
            engine.pad_id,
        ).means[:, layer]
        for side in ("positive", "negative")
    }
    expected = spans["positive"].mean(0) - spans["negative"].mean(0)
    got = torch.tensor(out["vector"]["values"][str(layer)])
    assert torch.allclose(got, expected, atol=2e-3, rtol=1e-3)

    listed = (await client.get("/api/v1/vectors")).json()["vectors"]
    assert "sarcasm-x" in [v["name"] for v in listed]
    meta = (await client.get("/api/v1/vectors/sarcasm-x")).json()["metadata"]
    assert meta["method"] == "contrastive_authored" and meta["format"] == "extracted"
    gen = {"prompt": "How do I boil an egg?", "trait": "sarcasm-x", "scalar": out["recommended_scalar"]}
    r = await client.post("/api/v1/generate", json={**gen, "max_tokens": 4})
    assert r.status_code == 200, r.text
    r = await client.post("/api/v1/vectors/extract", json=body)
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"
    assert (await client.delete("/api/v1/vectors/sarcasm-x")).status_code == 200


async def test_extract_streams_progress_from_texts(client):
    body = {
        "name": "texts-x",
        "positive": [p["positive"] for p in PAIRS],
        "negative": [p["negative"] for p in PAIRS],
        "layers": [10],
        "stream": True,
    }
    r = await client.post("/api/v1/vectors/extract", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    names = [e for e, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"}
    done = [d["done"] for e, d in events if e == "progress"]
    assert done == sorted(done) and done[-1] == events[0][1]["total"] and len(done) >= 5
    assert {d["stage"] for e, d in events if e == "progress"} >= {"fit", "baseline", "validate", "done"}
    result = events[-1][1]
    assert result["recommended_layer"] == 10 and result["split"]["kind"] == "texts"
    assert (await client.delete("/api/v1/vectors/texts-x")).status_code == 200


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"pairs": PAIRS[:7]}, 422, "pairs"),
        ({"layers": [99]}, 400, "layers"),
        ({"pairs": [{**PAIRS[0], "positive": "x" * 1001}] + PAIRS[1:]}, 422, "pairs.0.positive"),
        ({"pairs": [{**PAIRS[0], "positive": "x " * 450}] + PAIRS[1:]}, 400, "pairs.0"),
        ({"positive": ["a"] * 8}, 422, None),
        ({"name": "Bad Name"}, 422, "name"),
        ({"pairs": PAIRS, "extra": 1}, 422, "extra"),
        ({"name": "sarcasm"}, 403, "name"),  # shipped traits are read-only
    ],
)
async def test_bad_input_is_a_clear_4xx(client, change, status, param):
    body = {"name": "bad-x", "pairs": PAIRS, "layers": [10], **change}
    r = await client.post("/api/v1/vectors/extract", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
