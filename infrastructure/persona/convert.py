"""Turn Neuronpedia-style pickled assistant-axis files into the safe format of axis_data.py.

Unpickling executes code chosen by whoever wrote the file, so this runs only as an explicit,
one-off conversion of files the user trusts, never while serving.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from infrastructure.errors import PersonaDataError

_PCA_ATTRS = ("components_", "mean_", "explained_variance_")


def _tensor(value) -> torch.Tensor:
    return value.detach().float().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value).float()


def find_pca(obj) -> dict[str, torch.Tensor]:
    """components [K,H], mean [H], explained variance [K] from a sklearn-like PCA object, a dict holding
    one, or a dict of plain tensors (components / mean / explained_variance)."""
    if all(hasattr(obj, a) for a in _PCA_ATTRS):
        return {
            "components": _tensor(obj.components_),
            "mean": _tensor(obj.mean_),
            "explained_variance": _tensor(obj.explained_variance_),
        }
    if isinstance(obj, dict):
        for value in obj.values():
            if all(hasattr(value, a) for a in _PCA_ATTRS):
                return find_pca(value)
        keys = {k.rstrip("_"): v for k, v in obj.items() if isinstance(k, str)}
        if "components" in keys and "mean" in keys:
            variance = keys.get("explained_variance", torch.zeros(len(keys["components"])))
            return {
                "components": _tensor(keys["components"]),
                "mean": _tensor(keys["mean"]),
                "explained_variance": _tensor(variance),
            }
    raise PersonaDataError("no PCA found: expected components_/mean_/explained_variance_ or such tensors")


def find_contrast(obj) -> torch.Tensor:
    """The per-layer contrast (axis) vectors [L,H] from a tensor, a {layer: vector} dict or a dict holding one."""
    if isinstance(obj, torch.Tensor) or hasattr(obj, "shape"):
        t = _tensor(obj)
        return t if t.dim() == 2 else t.unsqueeze(0)
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):
            return torch.stack([_tensor(obj[k]) for k in sorted(obj)])
        for key in ("contrast_vectors", "vectors", "axis", "contrast"):
            if key in obj:
                return find_contrast(obj[key])
    raise PersonaDataError("no contrast vectors found: expected a [L,H] tensor or a dict holding one")


def layer_from(name: str, obj) -> int | None:
    """The PCA's layer: a 'layer' entry of the file, else 'layerN' in the file name."""
    if isinstance(obj, dict) and isinstance(obj.get("layer"), int):
        return obj["layer"]
    match = re.search(r"layer(\d+)", Path(name).name)
    return int(match.group(1)) if match else None


def converted(pca: dict[str, torch.Tensor], contrast: torch.Tensor | None, layer: int) -> dict[str, torch.Tensor]:
    """Axis tensors: PC1 (oriented with the contrast vector when given) is the monitoring direction and
    the roles' PCA mean its centre, as Neuronpedia projects (h - mean) on PC1."""
    components = pca["components"].clone()
    if contrast is not None:
        if not 0 <= layer < contrast.shape[0]:
            raise PersonaDataError(f"layer {layer} is outside the contrast vectors' {contrast.shape[0]} layers")
        if float(components[0] @ contrast[layer]) < 0:
            components[0] = -components[0]
    tensors = {
        "pca_components": components,
        "pca_mean": pca["mean"],
        "pca_explained_variance": pca["explained_variance"],
        "monitor_direction": components[0] / components[0].norm(),
        "monitor_center": pca["mean"].clone(),  # safetensors refuses tensors sharing memory
    }
    if contrast is not None:
        tensors["axis"] = contrast
    return tensors
