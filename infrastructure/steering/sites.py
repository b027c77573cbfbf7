"""Map TransformerLens-style hook names and layer numbers to steering sites of a HF decoder model."""

from __future__ import annotations

import re

import torch
from torch import nn

from infrastructure.errors import (
    HookOutOfRangeError,
    InvalidHookError,
    NonFiniteVectorError,
    VectorShapeError,
)
from infrastructure.steering.layers import LAYER_DIGITS

EMBEDDINGS_SITE = -1
_HOOK_RE = re.compile(rf"blocks\.({LAYER_DIGITS})\.hook_resid_(post|pre)", re.ASCII)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama/Qwen2-style causal LM (plain, bnb or AWQ-quantised)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InvalidHookError(f"unsupported architecture {type(model).__name__}: no decoder layers found")
    return layers


def site_module(model: nn.Module, site: int) -> nn.Module:
    """The module whose forward output a site modifies: a decoder layer, or the embeddings for -1."""
    if site == EMBEDDINGS_SITE:
        return model.get_input_embeddings()
    return decoder_layers(model)[site]


def parse_hook(hook: str | int, n_layers: int, param: str = "hook") -> int:
    """Resolve `blocks.L.hook_resid_post` (output of layer L), `blocks.L.hook_resid_pre` (input of
    layer L = output of L-1, the embeddings for L=0) or a plain layer number (= resid_post) to a site."""
    if isinstance(hook, bool):
        raise InvalidHookError("hook must be a hook name or a layer number", param)
    if isinstance(hook, int):
        layer, kind = hook, "post"
    else:
        match = _HOOK_RE.fullmatch(hook.strip())
        if match is None:
            raise InvalidHookError(
                f"unknown hook {hook!r}: use 'blocks.L.hook_resid_post' or 'blocks.L.hook_resid_pre'", param
            )
        layer, kind = int(match.group(1)), match.group(2)
    if not 0 <= layer < n_layers:
        raise HookOutOfRangeError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}", param)
    return layer - 1 if kind == "pre" else layer


def check_vector(values: torch.Tensor, hidden_size: int, param: str, allow_zero: bool = True) -> torch.Tensor:
    """Validate a steering vector: 1-D, the model's hidden size, finite (and non-zero when required)."""
    if values.dim() != 1 or values.shape[0] != hidden_size:
        raise VectorShapeError(
            f"vector has shape {list(values.shape)}, the model's hidden size is {hidden_size}", param
        )
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteVectorError("vector contains NaN or infinite values", param)
    if not allow_zero and float(values.norm()) == 0.0:
        raise VectorShapeError("vector has zero norm and cannot be normalised", param)
    return values
