"""Pure maths of contrastive extraction: the split, candidate layers, the fit, and the validation choices."""

from __future__ import annotations

import math

import pytest
import torch

from infrastructure.persona import contrastive as cx


def test_split_holds_out_every_fourth_example():
    fit, validation = cx.split(10)
    assert validation == [3, 7]
    assert fit == [0, 1, 2, 4, 5, 6, 8, 9]
    assert not set(fit) & set(validation)


def test_split_needs_enough_examples():
    with pytest.raises(ValueError, match="at least 8"):
        cx.split(7)


def test_candidate_layers_spread_over_the_middle():
    assert cx.candidate_layers(30) == [6, 10, 13, 16, 20]
    assert cx.candidate_layers(30, 1) == [6]
    assert all(0 <= k < 4 for k in cx.candidate_layers(4))


def test_fit_is_the_difference_of_means():
    pos = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])  # [N=2, L=1, H=2]
    neg = torch.tensor([[[0.0, 1.0]]])
    assert torch.equal(cx.fit(pos, neg), torch.tensor([[2.0, -1.0]]))
    with pytest.raises(ValueError):
        cx.fit(pos[:0], neg)


def test_scalar_margin_and_perplexity_ratio():
    assert cx.scalar_for(0.2, vector_norm=4.0, resid_median=100.0) == pytest.approx(5.0)
    assert cx.margin([-1.0, -2.0], [-3.0]) == pytest.approx(1.5)
    assert cx.ppl_ratio([-2.0], [-1.0]) == pytest.approx(math.e)


def _validation() -> cx.Validation:
    layers = [cx.LayerScore(6, 1.0, -1.0, -0.9), cx.LayerScore(10, 1.0, -1.2, -0.6)]
    v = cx.Validation(-0.9, layers)
    v.points = [
        cx.RangePoint(0.1, 1.0, -1.2, -0.6, 0.9, 1.2),
        cx.RangePoint(0.2, 2.0, -1.5, -0.3, 0.95, 1.9),
        cx.RangePoint(0.3, 3.0, -1.8, 0.1, 1.0, 2.5),  # fails the fluency guard
    ]
    return v


def test_layer_with_the_steepest_margin_rise_wins():
    v = _validation()
    assert v.layers[1].rise_per_unit == pytest.approx(3.0)
    assert v.layer == 10


def test_top_of_range_is_the_largest_fluent_fraction():
    v = _validation()
    assert [p.fluent for p in v.points] == [True, True, False]
    assert v.top.fraction == 0.2
    rec = cx.recommendation(v)
    assert rec["recommended_layer"] == 10 and rec["recommended_scalar"] == 2.0
    assert rec["recommended_scalar_range"] == [-2.0, 2.0]
    meta = v.as_metadata()
    assert meta["chosen_layer"] == 10 and meta["top_fraction"] == 0.2
    assert [p["fluent"] for p in meta["range"]] == [True, True, False]


def test_no_fluent_fraction_falls_back_to_the_smallest():
    v = _validation()
    for p in v.points:
        p.ppl_ratio_plus = 5.0
    assert v.top.fraction == 0.1
