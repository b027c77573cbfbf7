"""The vector registry over HTTP: JSON floats, safetensors and GGUF uploads, list/get/delete,
use by name in /api/v1/generate, persistence (into a tmp vectors dir) and auth."""

from __future__ import annotations

import io
import json

import gguf
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save

from app.factory import create_app
from infrastructure.storage.traits import load_traits
from tests.helpers import client_for

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "What is the capital of France?"


def _vector(seed: int, norm: float = 60.0, size: int = 576) -> torch.Tensor:
    v = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


VEC = _vector(5)


def _gguf_bytes(tensors: dict[str, np.ndarray], tmp_path) -> bytes:
    """A control vector written the way llama.cpp's cvector-generator / repeng's export_gguf do."""
    path = tmp_path / "cv.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def vectors_dir(tmp_path_factory):
    """A tmp VECTORS_DIR holding one 'shipped' trait (the real data/ is never written)."""
    folder = tmp_path_factory.mktemp("vectors")
    shipped = {
        "trait_name": "shipped-trait",
        "model_name": MODEL,
        "vectors": {"12": _vector(9).tolist()},
        "metadata": {},
    }
    (folder / "shipped-trait.json").write_text(json.dumps(shipped))
    return folder


@pytest.fixture(scope="module")
def reg_runtime(make_runtime, vectors_dir):
    return make_runtime(vectors_dir=vectors_dir, prompts_dir=vectors_dir)


@pytest.fixture
async def api(reg_runtime):
    async with client_for(create_app(runtime=reg_runtime)) as c:
        yield c


async def _generate(api, trait: str | None, scalar: float = 1.0) -> str:
    if trait is None:
        r = await api.post("/api/v1/generate/baseline", json={"prompt": PROMPT, "temperature": 0, "max_tokens": 6})
    else:
        body = {"prompt": PROMPT, "trait": trait, "scalar": scalar, "temperature": 0, "max_tokens": 6}
        r = await api.post("/api/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()["text"]


async def _upload(api, name: str, data: bytes, **fields) -> httpx.Response:
    form = {"name": name, **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}}
    return await api.post("/api/v1/vectors", data=form, files={"file": ("cv.bin", io.BytesIO(data))})


@pytest.fixture(scope="module")
def texts() -> dict:
    return {}


async def test_json_create_list_get_and_use_by_name(api, texts):
    texts["baseline"] = await _generate(api, None)
    r = await api.post(
        "/api/v1/vectors", json={"name": "probe-1", "layer": 10, "vector": VEC.tolist(), "description": "d"}
    )
    assert r.status_code == 201, r.text
    detail = r.json()
    assert detail["layers"] == [10] and detail["default_layer"] == 10 and detail["origin"] == "registry"
    assert detail["format"] == "json" and detail["persisted"] is False and detail["model"] == MODEL
    assert detail["norms"] == {"10": pytest.approx(60.0, abs=1e-3)} and detail["values"] is None
    listed = (await api.get("/api/v1/vectors")).json()["vectors"]
    assert [v["name"] for v in listed] == ["probe-1"]  # shipped traits are not registry entries
    got = (await api.get("/api/v1/vectors/probe-1", params={"values": True, "layer": 10})).json()
    assert got["values"]["10"] == pytest.approx(VEC.tolist(), abs=1e-6)
    traits = [t["name"] for t in (await api.get("/api/v1/traits")).json()["traits"]]
    assert "probe-1" in traits and "shipped-trait" in traits
    texts["steered"] = await _generate(api, "probe-1")
    assert texts["steered"] != texts["baseline"]
    assert await _generate(api, "probe-1", scalar=0.0) == texts["baseline"]


async def test_safetensors_upload_steers_like_the_json_vector(api, texts):
    data = save({"layers.10": VEC.clone(), "layers.12": _vector(6)})
    r = await _upload(api, "probe-st", data, default_layer=10, description="from safetensors")
    assert r.status_code == 201, r.text
    detail = r.json()
    assert detail["layers"] == [10, 12] and detail["default_layer"] == 10 and detail["format"] == "safetensors"
    assert detail["metadata"]["filename"] == "cv.bin" and detail["description"] == "from safetensors"
    assert await _generate(api, "probe-st") == texts["steered"]


async def test_gguf_upload_steers_like_the_json_vector(api, texts, tmp_path):
    data = _gguf_bytes({"direction.10": VEC.numpy(), "direction.11": _vector(7).numpy()}, tmp_path)
    r = await _upload(api, "probe-gguf", data, default_layer=10)
    assert r.status_code == 201, r.text
    detail = r.json()
    assert detail["layers"] == [10, 11] and detail["format"] == "gguf"
    assert detail["metadata"]["file_metadata"]["general.architecture"] == "controlvector"
    assert await _generate(api, "probe-gguf") == texts["steered"]


async def test_delete(api):
    r = await api.delete("/api/v1/vectors/probe-gguf")
    assert r.json() == {"name": "probe-gguf", "deleted": True, "file_removed": False}
    assert (await api.get("/api/v1/vectors/probe-gguf")).status_code == 404
    r = await api.post("/api/v1/generate", json={"prompt": PROMPT, "trait": "probe-gguf", "scalar": 1.0})
    assert r.status_code == 404 and r.json()["error"]["param"] == "trait"
    r = await api.delete("/api/v1/vectors/probe-gguf")
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_vector"


async def test_persist_writes_seed_format_and_reloads(api, vectors_dir):
    body = {"name": "kept", "vectors": {"10": VEC.tolist(), "20": _vector(8).tolist()}, "default_layer": 20}
    r = await api.post("/api/v1/vectors", json={**body, "persist": True})
    assert r.status_code == 201, r.text
    path = vectors_dir / "registry" / "kept.json"
    assert r.json()["persisted"] is True and r.json()["file"] == "registry/kept.json"  # no server paths
    saved = json.loads(path.read_text())
    assert saved["trait_name"] == "kept" and saved["model_name"] == MODEL and sorted(saved["vectors"]) == ["10", "20"]
    reloaded = load_traits(vectors_dir, vectors_dir, {MODEL}, 576, 30).get("kept")
    assert reloaded.default_layer == 20 and torch.equal(reloaded.vectors[10], VEC)
    assert reloaded.metadata["origin"] == "registry"
    r = await api.delete("/api/v1/vectors/kept")
    assert r.json()["file_removed"] is True and not path.exists()


async def test_names_and_overwrite(api):
    one = {"layer": 10, "vector": VEC.tolist()}
    # shipped traits are read-only through the API (issue 20, item 3): with or without overwrite / persist
    for extra in ({}, {"overwrite": True}, {"overwrite": True, "persist": True}):
        r = await api.post("/api/v1/vectors", json={"name": "shipped-trait", **one, **extra})
        assert r.status_code == 403 and r.json()["error"]["type"] == "read_only_trait", r.text
        assert r.json()["error"]["param"] == "name"
    r = await api.post("/api/v1/vectors", json={"name": "Bad Name", **one})
    assert r.status_code == 422 and r.json()["error"]["param"] == "name"
    r = await api.delete("/api/v1/vectors/shipped-trait")
    assert r.status_code == 403 and "shipped" in r.json()["error"]["message"]
    assert "/" not in r.json()["error"]["message"]  # no server path in the answer
    r = await api.post("/api/v1/vectors", json={"name": "dup", **one})
    assert r.status_code == 201
    assert (await api.post("/api/v1/vectors", json={"name": "dup", **one})).status_code == 409
    r = await api.post("/api/v1/vectors", json={"name": "dup", "layer": 11, "vector": VEC.tolist(), "overwrite": True})
    assert r.status_code == 201 and r.json()["layers"] == [11]


@pytest.mark.parametrize(
    "body, status, param, type_",
    [
        ({"layer": 10, "vector": [1.0, 2.0]}, 400, "vector", "vector_shape"),
        ({"layer": 30, "vector": VEC.tolist()}, 400, "layer", "hook_out_of_range"),
        ({"hook": "blocks.0.hook_resid_pre", "vector": VEC.tolist()}, 400, "hook", "invalid_hook"),
        ({"hook": "blocks.3.attn", "vector": VEC.tolist()}, 400, "hook", "invalid_hook"),
        ({"vectors": {"40": VEC.tolist()}}, 400, "vectors.40", "hook_out_of_range"),
        ({"layer": 10}, 422, None, "validation_error"),
        ({"layer": 10, "vector": VEC.tolist(), "colour": 1}, 422, "colour", "validation_error"),
    ],
)
async def test_bad_json_bodies_name_the_field(api, body, status, param, type_):
    r = await api.post("/api/v1/vectors", json={"name": "bad", **body})
    error = r.json()["error"]
    assert r.status_code == status and error["type"] == type_ and error.get("param") == param, error


async def test_bad_uploads_name_the_field(api, tmp_path):
    nan = VEC.numpy().copy()
    nan[3] = np.nan
    cases = [
        (save({"10": _vector(1, size=64)}), "vector_shape", "hidden size is 576"),
        (save({"weird_key": VEC.clone()}), "invalid_request_error", "does not name a layer"),
        (save({"30": VEC.clone()}), "hook_out_of_range", "out of range"),
        (save({"10": torch.stack([VEC, VEC])}), "invalid_request_error", "expected one vector"),
        (_gguf_bytes({"direction.10": nan}, tmp_path), "non_finite_vector", "NaN"),
        (b"\x00" * 64, "invalid_request_error", "not a GGUF or safetensors"),
        (b"GGUF" + b"\x00" * 60, "invalid_request_error", "unreadable GGUF"),
    ]
    for data, type_, words in cases:
        r = await _upload(api, "bad-file", data)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "file" and error["type"] == type_, error
        assert words in error["message"]
    r = await api.post("/api/v1/vectors", data={"name": "no-file"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = await _upload(api, "bad-layer", save({"10": VEC.clone()}), default_layer=12)
    assert r.status_code == 400 and r.json()["error"]["param"] == "default_layer"
    r = await _upload(api, "bad-flag", save({"10": VEC.clone()}), persist="maybe")
    assert r.status_code == 422 and r.json()["error"]["param"] == "persist"
    assert "bad-file" not in [v["name"] for v in (await api.get("/api/v1/vectors")).json()["vectors"]]


async def test_registry_is_behind_auth_and_the_playground_is_not(reg_runtime):
    app = create_app(reg_runtime.settings.model_copy(update={"secret": "s3cret"}), runtime=reg_runtime)
    async with client_for(app) as c:
        assert (await c.get("/api/v1/vectors")).status_code == 401
        r = await c.post("/api/v1/vectors", json={"name": "x", "layer": 1, "vector": VEC.tolist()})
        assert r.status_code == 401 and "x" not in reg_runtime.traits.traits
        ok = await c.get("/api/v1/vectors", headers={"X-SECRET-KEY": "s3cret"})
        assert ok.status_code == 200
        assert (await c.get("/api/v1/vectors", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        page = await c.get("/")
        assert page.status_code == 200 and "<title>" in page.text and "text/html" in page.headers["content-type"]
        assert (await c.get("/playground/app.js")).status_code == 200
        assert (await c.get("/playground/nope.js")).status_code == 401
        assert (await c.get("/docs")).status_code == 401
