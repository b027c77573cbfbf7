"""Pure maths of persona-vector extraction: response-span means, difference of means, file metadata.

Shapes: B rows, T positions, L decoder layers, H hidden size. A row's response span is [start, end)
in its (right-padded) token sequence; only those positions enter a mean.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

LAYER_CONVENTION = "layer k = output of decoder layer k (blocks.k.hook_resid_post)"
# Steering strength relative to the median residual norm at the steered layer: 0.05-0.3x changes
# the text sensibly on SmolLM2-135M, >=1x gives junk (shared/reference/anchors.md).
SCALE_LOW, SCALE_DEFAULT, SCALE_HIGH = 0.05, 0.2, 0.3


def span_weights(spans: list[tuple[int, int]], width: int) -> torch.Tensor:
    """[B,T] weights: 1/len over each row's span, 0 elsewhere (a weighted sum is then a mean)."""
    weights = torch.zeros(len(spans), width)
    for b, (start, end) in enumerate(spans):
        if end <= start:
            raise ValueError(f"row {b} has an empty response span [{start}, {end})")
        weights[b, start:end] = 1.0 / (end - start)
    return weights


def span_means(hidden: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Mean of hidden [B,T,H] over each row's span: [B,H]."""
    weights = span_weights(spans, hidden.shape[1]).to(hidden.device, hidden.dtype)
    return torch.einsum("bt,bth->bh", weights, hidden)


def span_token_norms(hidden: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Norms of every in-span token of hidden [B,T,H], flattened (position 0 never counts: attention sink)."""
    norms = hidden.float().norm(dim=-1)
    picked = [norms[b, max(start, 1) : end] for b, (start, end) in enumerate(spans)]
    return torch.cat(picked) if picked else torch.zeros(0)


def diff_of_means(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Persona vector per layer: mean over positive rows - mean over negative rows ([N,L,H] -> [L,H])."""
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError("both sides need at least one sample")
    return pos.float().mean(0) - neg.float().mean(0)


def recommend_layer(vector_norms: list[float], resid_medians: list[float]) -> int:
    """The middle-third layer (n//3 .. 2n//3) where the vector is largest relative to the residual stream."""
    n = len(vector_norms)
    band = range(n // 3, max(n // 3 + 1, (2 * n) // 3 + 1))
    return max(band, key=lambda k: vector_norms[k] / max(resid_medians[k], 1e-6))


def scalar_range(vector_norm: float, resid_median: float) -> tuple[float, float, float]:
    """(low, default, high) scalars s such that |s*v| is 0.05, 0.2 and 0.3 of the residual norm."""
    unit = resid_median / max(vector_norm, 1e-6)
    return tuple(round(f * unit, 3) for f in (SCALE_LOW, SCALE_DEFAULT, SCALE_HIGH))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def vector_file(
    trait: str,
    model_id: str,
    vectors: torch.Tensor,
    resid_medians: list[float],
    *,
    n_samples: dict[str, int],
    prompts_sha256: str,
    description: str,
    judge: dict | None = None,
    created_by: str = "scripts/extract_persona_vectors.py",
) -> dict:
    """Seed 002's vector-file document for vectors [L,H], with the metadata the service reads."""
    n_layers, hidden = vectors.shape
    norms = [float(v.norm()) for v in vectors]
    layer = recommend_layer(norms, resid_medians)
    low, default, high = scalar_range(norms[layer], resid_medians[layer])
    metadata = {
        "model_id": model_id,
        "hidden_size": hidden,
        "n_layers": n_layers,
        "layer_convention": LAYER_CONVENTION,
        "norms": {str(k): round(n, 4) for k, n in enumerate(norms)},
        "residual_median_norms": {str(k): round(r, 3) for k, r in enumerate(resid_medians)},
        "median_residual_norm": round(resid_medians[layer], 3),
        "recommended_layer": layer,
        "recommended_scalar": default,
        "recommended_scalar_range": [-high, high],
        "scalar_scale_note": f"|s*v| = {SCALE_LOW}..{SCALE_HIGH} x median residual norm for s = {low}..{high}",
        "n_samples": n_samples,
        "prompts_sha256": prompts_sha256,
        "judge_used": bool(judge),
        "created_by": created_by,
        "description": description,
    }
    if judge:
        metadata["judge"] = judge
    return {
        "trait_name": trait,
        "model_name": model_id,
        "vectors": {str(k): [round(float(x), 6) for x in v] for k, v in enumerate(vectors)},
        "metadata": metadata,
    }
