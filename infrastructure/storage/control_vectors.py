"""Read control-vector files made by other tools into per-layer tensors.

Accepted formats (detected from the first bytes, not the file name):

- GGUF, as written by llama.cpp's `cvector-generator` and repeng's `ControlVector.export_gguf`:
  one 1-D float tensor per layer named `direction.N`.
- safetensors: one 1-D tensor per layer, the key naming the layer as `N`, `layers.N`,
  `layer.N`, `layer_N`, `model.layers.N` or `direction.N`.

Layer convention: index N is added to the *output* of decoder layer N (0-based,
`blocks.N.hook_resid_post`), which is what llama.cpp does (its `direction.N` is added at the end
of layer N's block, `l_out-N`; it never reads `direction.0`) and what repeng does (its layer ids
index `model.layers`, whose outputs it modifies). That is also what layer N means in this
service's trait files, so no shift is applied.
"""

from __future__ import annotations

import math
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from infrastructure.errors import InvalidRequestError
from infrastructure.steering.layers import LAYER_DIGITS
from infrastructure.storage.gguf_layout import check_gguf_layout

GGUF_MAGIC = b"GGUF"
_LAYER_KEY = re.compile(rf"(?:(?:model\.)?layers?|direction)?[._]?({LAYER_DIGITS})", re.ASCII)
MAX_TENSORS = 1024  # more layers than any served model has
LAYER_CONVENTION = "layer N = output of decoder layer N (blocks.N.hook_resid_post), as llama.cpp and repeng"


@dataclass
class ControlVectorFile:
    """The per-layer vectors of one file, with what was learnt about it."""

    format: str  # "gguf" | "safetensors"
    vectors: dict[int, torch.Tensor]
    metadata: dict = field(default_factory=dict)


def layer_of_key(key: str, param: str = "file") -> int:
    """The layer number a tensor name stands for (see the module docstring for accepted forms)."""
    match = _LAYER_KEY.fullmatch(key)
    if match is None:
        shown = key if len(key) <= 60 else key[:57] + "..."
        raise InvalidRequestError(
            f"tensor {shown!r} does not name a layer: use 'N', 'layers.N', 'layer_N', 'model.layers.N' or "
            "'direction.N' (N in ASCII digits, no leading zero)",
            param,
        )
    return int(match.group(1))


def _collect(named: list[tuple[str, torch.Tensor]], param: str) -> dict[int, torch.Tensor]:
    if len(named) > MAX_TENSORS:
        raise InvalidRequestError(f"the file holds {len(named)} tensors; at most {MAX_TENSORS} (one per layer)", param)
    vectors: dict[int, torch.Tensor] = {}
    for key, tensor in named:
        layer = layer_of_key(key, param)
        if not tensor.is_floating_point():  # BOOL / I64 tensors are masks or ids, not directions
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise InvalidRequestError(f"tensor {key!r} is {dtype}; expected floats", param)
        if tensor.dim() != 1:
            raise InvalidRequestError(f"tensor {key!r} has shape {list(tensor.shape)}; expected one vector", param)
        if layer in vectors:
            raise InvalidRequestError(f"tensor {key!r} repeats layer {layer}", param)
        vectors[layer] = tensor.detach().to(torch.float32).clone()
    if not vectors:
        raise InvalidRequestError("the file holds no tensors", param)
    return vectors


def read_safetensors(data: bytes, param: str = "file") -> ControlVectorFile:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InvalidRequestError(f"unreadable safetensors file: {exc}", param) from exc
    return ControlVectorFile("safetensors", _collect(sorted(tensors.items()), param))


def _gguf_fields(reader) -> dict:
    """The file's string and number metadata (architecture, model hint, layer count). Non-finite floats are
    dropped: they would make the registry's JSON (answers and persisted files) invalid."""
    out = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF.") or not fld.data:
            continue
        try:
            value = fld.contents()
        except Exception:  # array or unknown field types: not needed here
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, (str, int, float)):
            out[name] = value
    return out


def _check_float(reader, param: str) -> None:
    from gguf import GGMLQuantizationType as Q

    for t in reader.tensors:
        if t.tensor_type not in (Q.F32, Q.F16):
            raise InvalidRequestError(f"tensor {t.name!r} is {t.tensor_type.name}; expected F32 or F16", param)


def read_gguf(data: bytes, param: str = "file") -> ControlVectorFile:
    from gguf import GGUFReader

    check_gguf_layout(data, param)  # every declared count bounded before the reader acts on it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "control.gguf"
        path.write_bytes(data)
        try:
            reader = GGUFReader(path)
            _check_float(reader, param)
            named = [(t.name, torch.from_numpy(np.array(t.data, dtype=np.float32)).flatten()) for t in reader.tensors]
            dims = {t.name: [int(d) for d in t.shape if int(d) != 1] for t in reader.tensors}
            meta = _gguf_fields(reader)
        except (ValueError, KeyError, IndexError, struct.error, TypeError, OverflowError) as exc:
            raise InvalidRequestError(f"unreadable GGUF file: {exc}", param) from exc
    for name, shape in dims.items():
        if len(shape) > 1:
            raise InvalidRequestError(f"tensor {name!r} has shape {shape}; expected one vector", param)
    return ControlVectorFile("gguf", _collect(named, param), meta)


def read_control_vector(data: bytes, param: str = "file") -> ControlVectorFile:
    """Parse a GGUF or safetensors control vector, whichever the bytes are."""
    if data[:4] == GGUF_MAGIC:
        return read_gguf(data, param)
    if len(data) > 9 and data[8:9] == b"{":
        return read_safetensors(data, param)
    raise InvalidRequestError("not a GGUF or safetensors control-vector file", param)


def vectors_from_floats(per_layer: dict[int, list[float]]) -> dict[int, torch.Tensor]:
    """Per-layer float lists (a JSON registration) as float32 tensors."""
    return {layer: torch.tensor(values, dtype=torch.float32) for layer, values in per_layer.items()}
