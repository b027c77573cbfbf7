"""Pure maths of contrastive extraction on authored answers: the split, the fit, the validation choices.

A trait is given as contrastive examples: a trait-expressing (positive) and a trait-free (negative)
answer to the same question, or two sets of texts. Read teacher-forced, the vector at layer k is the
mean over positive rows minus the mean over negative rows of each row's mean residual over its answer
tokens. A validation split that never enters the fit then picks the layer and the scalar range:

- margin(s) = mean log-prob per token of the positive answers - the same of the negative answers, with
  s*v added at the layer. Its rise per unit of scale, (margin(+a) - margin(-a)) / 2a with
  |a*v| = PROBE_FRACTION x the layer's median residual norm, ranks the candidate layers.
- the fluency guard: at the chosen layer, the top of the range is the largest fraction of the residual
  norm (FRACTIONS) at which the perplexity of the trait-free answers stays under
  MAX_PPL_RATIO x its unsteered value at both ends (-top and +top).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

METHOD = "contrastive_authored"
VALIDATION_EVERY = 4  # every 4th example (indices 3, 7, 11, ...) is held out for validation
PROBE_FRACTION = 0.1
FRACTIONS = (0.1, 0.15, 0.2, 0.3)
MAX_PPL_RATIO = 2.0
MIN_EXAMPLES = 8  # per side: 6 to fit, 2 to validate


def split(n: int, every: int = VALIDATION_EVERY) -> tuple[list[int], list[int]]:
    """(fit, validation) indices of n examples: every `every`-th one validates, the rest fit."""
    if n < MIN_EXAMPLES:
        raise ValueError(f"{n} examples: at least {MIN_EXAMPLES} are needed (validation takes one in {every})")
    validation = [i for i in range(n) if i % every == every - 1]
    return [i for i in range(n) if i % every != every - 1], validation


def candidate_layers(n_layers: int, count: int = 5) -> list[int]:
    """`count` layers spread evenly over [n/5, 2n/3]: early enough to change what follows, late enough to
    carry a trait (the last third mostly prepares the next token)."""
    low, high = n_layers // 5, max(n_layers // 5, (2 * n_layers) // 3)
    if count <= 1 or high == low:
        return [low]
    return sorted({round(low + i * (high - low) / (count - 1)) for i in range(count)})


def fit(pos_means: torch.Tensor, neg_means: torch.Tensor) -> torch.Tensor:
    """[L,H] difference of the per-row answer means ([N,L,H] each side)."""
    if pos_means.shape[0] == 0 or neg_means.shape[0] == 0:
        raise ValueError("both sides need at least one example")
    return pos_means.float().mean(0) - neg_means.float().mean(0)


def medians(token_norms: list[torch.Tensor]) -> list[float]:
    """Per layer, the median norm of the residual over answer tokens."""
    return [float(n.median()) if n.numel() else 0.0 for n in token_norms]


def scalar_for(fraction: float, vector_norm: float, resid_median: float) -> float:
    """The s with |s*v| = fraction x the residual median norm."""
    return fraction * resid_median / max(vector_norm, 1e-8)


def margin(pos_logprobs: list[float], neg_logprobs: list[float]) -> float:
    return sum(pos_logprobs) / len(pos_logprobs) - sum(neg_logprobs) / len(neg_logprobs)


def ppl_ratio(steered_neg: list[float], base_neg: list[float]) -> float:
    """Perplexity of the trait-free answers steered over unsteered (exp of the mean log-prob drop)."""
    return math.exp(sum(base_neg) / len(base_neg) - sum(steered_neg) / len(steered_neg))


@dataclass
class LayerScore:
    layer: int
    scalar: float  # the probe scalar (PROBE_FRACTION of the residual norm)
    margin_minus: float
    margin_plus: float

    @property
    def rise_per_unit(self) -> float:
        """Margin rise per unit of |s*v| / residual norm, in nats per token."""
        return (self.margin_plus - self.margin_minus) / (2 * PROBE_FRACTION)


@dataclass
class RangePoint:
    fraction: float
    scalar: float
    margin_minus: float
    margin_plus: float
    ppl_ratio_minus: float
    ppl_ratio_plus: float

    @property
    def fluent(self) -> bool:
        return max(self.ppl_ratio_minus, self.ppl_ratio_plus) <= MAX_PPL_RATIO


@dataclass
class Validation:
    baseline_margin: float
    layers: list[LayerScore]
    points: list[RangePoint] = field(default_factory=list)

    @property
    def layer(self) -> int:
        return max(self.layers, key=lambda s: s.rise_per_unit).layer

    @property
    def top(self) -> RangePoint:
        """The largest fraction that passes the fluency guard (the smallest one if none does)."""
        fluent = [p for p in self.points if p.fluent]
        return max(fluent, key=lambda p: p.fraction) if fluent else min(self.points, key=lambda p: p.fraction)

    def as_metadata(self) -> dict:
        return {
            "probe_fraction": PROBE_FRACTION,
            "baseline_margin": round(self.baseline_margin, 4),
            "layers": [
                {
                    "layer": s.layer,
                    "scalar": round(s.scalar, 4),
                    "margin_minus": round(s.margin_minus, 4),
                    "margin_plus": round(s.margin_plus, 4),
                    "rise_per_unit": round(s.rise_per_unit, 4),
                }
                for s in self.layers
            ],
            "chosen_layer": self.layer,
            "fluency_guard": {"max_ppl_ratio": MAX_PPL_RATIO, "on": "trait-free validation answers"},
            "range": [
                {
                    "fraction": p.fraction,
                    "scalar": round(p.scalar, 4),
                    "margin_minus": round(p.margin_minus, 4),
                    "margin_plus": round(p.margin_plus, 4),
                    "ppl_ratio_minus": round(p.ppl_ratio_minus, 4),
                    "ppl_ratio_plus": round(p.ppl_ratio_plus, 4),
                    "fluent": p.fluent,
                }
                for p in self.points
            ],
            "top_fraction": self.top.fraction,
        }


def recommendation(validation: Validation) -> dict:
    """The metadata fields the service reads: layer, scalar (the top of the fluent range) and the range."""
    top = validation.top
    s = round(top.scalar, 3)
    return {
        "recommended_layer": validation.layer,
        "recommended_scalar": s,
        "recommended_scalar_range": [-s, s],
        "scalar_scale_note": f"|s*v| = {top.fraction} x median residual norm at s = {s} (fluency-guarded top)",
    }
