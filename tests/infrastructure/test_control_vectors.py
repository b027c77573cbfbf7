"""Control-vector files read without a model: GGUF (llama.cpp / repeng) and safetensors, the layer
names each accepts, and typed errors naming the form field for everything else."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save

from infrastructure.errors import InvalidRequestError
from infrastructure.storage.control_vectors import (
    layer_of_key,
    read_control_vector,
    vectors_from_floats,
)


def gguf_bytes(tmp_path, tensors: dict[str, np.ndarray]) -> bytes:
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


@pytest.mark.parametrize(
    ("key", "layer"),
    [("7", 7), ("layers.7", 7), ("layer.7", 7), ("layer_7", 7), ("model.layers.12", 12), ("direction.3", 3)],
)
def test_layer_names(key, layer):
    assert layer_of_key(key) == layer


@pytest.mark.parametrize("key", ["weight", "layers.x", "blocks.3", "direction.-1"])
def test_names_without_a_layer_are_refused_naming_the_field(key):
    with pytest.raises(InvalidRequestError) as err:
        layer_of_key(key, "file")
    assert err.value.param == "file" and repr(key) in err.value.message


def test_gguf_from_repeng_keeps_values_layers_and_metadata(tmp_path):
    a, b = np.arange(4, dtype=np.float32), -np.ones(4, dtype=np.float32)
    parsed = read_control_vector(gguf_bytes(tmp_path, {"direction.1": a, "direction.2": b}))
    assert parsed.format == "gguf" and sorted(parsed.vectors) == [1, 2]
    assert parsed.vectors[1].tolist() == a.tolist() and parsed.vectors[2].dtype == torch.float32
    assert parsed.metadata["controlvector.model_hint"] == "llama"
    assert parsed.metadata["controlvector.layer_count"] == 2


def test_gguf_matrix_is_refused(tmp_path):
    data = gguf_bytes(tmp_path, {"direction.1": np.ones((2, 4), dtype=np.float32)})
    with pytest.raises(InvalidRequestError, match="expected one vector"):
        read_control_vector(data)


def test_safetensors_any_key_form_and_half_precision(tmp_path):
    data = save({"model.layers.5": torch.ones(4, dtype=torch.float16), "layer_6": torch.full((4,), 2.0)})
    parsed = read_control_vector(data)
    assert parsed.format == "safetensors"
    assert {k: v.tolist() for k, v in parsed.vectors.items()} == {5: [1.0] * 4, 6: [2.0] * 4}
    assert all(v.dtype == torch.float32 for v in parsed.vectors.values())


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"layers.1": torch.ones(2, 4)}, "expected one vector"),
        ({"layers.1": torch.ones(4), "direction.1": torch.ones(4)}, "repeats layer 1"),
        ({"bias": torch.ones(4)}, "does not name a layer"),
    ],
)
def test_bad_safetensors_are_refused(tensors, message):
    with pytest.raises(InvalidRequestError, match=message) as err:
        read_control_vector(save(tensors))
    assert err.value.param == "file"


@pytest.mark.parametrize("data", [b"", b"not a control vector", b"GGUF" + b"\0" * 8, b"\x10" + b"\0" * 7 + b"{bad"])
def test_unreadable_bytes_are_a_typed_error(data):
    with pytest.raises(InvalidRequestError) as err:
        read_control_vector(data, "upload")
    assert err.value.param == "upload"


def test_floats_become_float32_tensors_per_layer():
    out = vectors_from_floats({3: [0.5, 1.5], 4: [1, 2]})
    assert {k: (v.dtype, v.tolist()) for k, v in out.items()} == {
        3: (torch.float32, [0.5, 1.5]),
        4: (torch.float32, [1.0, 2.0]),
    }
