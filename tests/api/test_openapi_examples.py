"""Every request example in /openapi.json succeeds when sent as it is (what Swagger UI's "Try it
out" sends), against the real embedded model."""

from __future__ import annotations

import asyncio

import gguf
import numpy as np
import pytest

pytestmark = pytest.mark.slow

REGISTERED = ("my-direction", "my-control-vector")


def _resolve(schema: dict, spec: dict) -> dict:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def json_examples(spec: dict) -> list[tuple[str, dict]]:
    """(path, body) for every JSON request example: the media type's `example`/`examples` and the
    body schema's `examples`."""
    found = []
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if media is None:
                continue
            bodies = [media["example"]] if "example" in media else []
            bodies += [e["value"] for e in media.get("examples", {}).values()]
            bodies += _resolve(media["schema"], spec).get("examples", [])
            found += [(path, body) for body in bodies]
    return found


def form_defaults(schema: dict) -> dict[str, str]:
    """What Swagger UI's form sends untouched: each field's example or default. A field with neither
    would get a made-up sample (0 for an integer), so every field must have one."""
    fields = {}
    for name, prop in schema["properties"].items():
        if prop.get("format") == "binary":
            continue
        assert "example" in prop or "default" in prop, f"form field {name} has no example or default"
        value = prop.get("example", prop.get("default"))
        fields[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return fields


def repeng_file(tmp_path, layers: range, hidden: int) -> bytes:
    """A control vector as repeng's export_gguf writes it: direction.N for layers 1..N-1, no layer 0."""
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(layers))
    rng = np.random.default_rng(0)
    for layer in layers:
        writer.add_tensor(f"direction.{layer}", (rng.standard_normal(hidden) * 0.05).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


async def test_every_json_example_succeeds_as_sent(client):
    spec = (await client.get("/openapi.json")).json()
    examples = json_examples(spec)
    paths = {path for path, _ in examples}
    assert {"/api/v1/generate", "/v1/chat/completions", "/api/v1/vectors", "/v1/steer/completion-chat"} <= paths
    assert {"/v1/completions", "/api/v1/presets"} <= paths
    try:
        answers = await asyncio.gather(*(client.post(path, json=body) for path, body in examples))
        for (path, _), r in zip(examples, answers, strict=True):
            assert r.status_code in (200, 201), (path, r.text[:500])
            assert r.content, path
        registered = next(r.json() for (p, _), r in zip(examples, answers, strict=True) if p == "/api/v1/vectors")
        assert registered["layers"] == [15] and registered["origin"] == "registry"
    finally:
        await client.delete("/api/v1/vectors/my-direction")
        await client.delete("/api/v1/presets/smol-helpful")  # the presets example's: GET /v1/models lists presets


async def test_the_registry_example_has_the_served_models_hidden_size(client, loaded_model):
    spec = (await client.get("/openapi.json")).json()
    example = spec["paths"]["/api/v1/vectors"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert len(example["vector"]) == loaded_model.hidden_size == 576


async def test_upload_form_defaults_register_a_repeng_file(client, tmp_path, loaded_model):
    spec = (await client.get("/openapi.json")).json()
    schema = spec["paths"]["/api/v1/vectors"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = form_defaults(schema)
    assert fields["default_layer"] == ""  # untouched: no layer that the file may lack
    data = repeng_file(tmp_path, range(1, loaded_model.n_layers), loaded_model.hidden_size)
    try:
        r = await client.post("/api/v1/vectors", data=fields, files={"file": ("repeng.gguf", data)})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["name"] == "my-control-vector" and body["layers"] == list(range(1, 30))
        assert body["default_layer"] == 15 and body["persisted"] is False
    finally:
        await client.delete("/api/v1/vectors/my-control-vector")
