"""Assistant-axis maths: axis per layer, PCA of role means oriented with the axis, monitoring values, AUC."""

from __future__ import annotations

import torch


def axis_per_layer(default_means: torch.Tensor, role_means: torch.Tensor) -> torch.Tensor:
    """mean(default rows) - mean(role means): [D,L,H], [R,L,H] -> [L,H] (positive = assistant-like)."""
    return default_means.float().mean(0) - role_means.float().mean(0)


def pca(points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(components [K,H], mean [H], explained variance [K]) of points [N,H], by SVD of the centred data."""
    mean = points.float().mean(0)
    centred = points.float() - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(k, vh.shape[0])
    variance = s[:k] ** 2 / max(points.shape[0] - 1, 1)
    return vh[:k].contiguous(), mean, variance


def orient(components: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Flip the first component so that it points the way the axis does (PCA signs are arbitrary)."""
    out = components.clone()
    if float(out[0] @ axis) < 0:
        out[0] = -out[0]
    return out


def axis_tensors(default_means: torch.Tensor, role_means: torch.Tensor, axis_layer: int, k: int = 8) -> dict:
    """Every tensor of the axis file (see infrastructure/persona/axis_data.py)."""
    axis = axis_per_layer(default_means, role_means)
    default_mean, role_mean = default_means.float().mean(0), role_means.float().mean(0)
    components, mean, variance = pca(role_means[:, axis_layer], k)
    direction = axis[axis_layer] / axis[axis_layer].norm()
    return {
        "axis": axis,
        "default_mean": default_mean,
        "role_mean": role_mean,
        "pca_components": orient(components, axis[axis_layer]),
        "pca_mean": mean,
        "pca_explained_variance": variance,
        "monitor_direction": direction,
        "monitor_center": (default_mean[axis_layer] + role_mean[axis_layer]) / 2,
    }


def auc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))
