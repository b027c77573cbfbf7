"""Pure persona maths on tiny tensors: span means, difference of means, metadata, PCA orientation, AUC."""

from __future__ import annotations

import math

import pytest
import torch

from infrastructure.persona.axis_build import auc, axis_tensors, orient, pca
from infrastructure.persona.convert import find_contrast, find_pca, layer_from
from infrastructure.persona.extraction import (
    LAYER_CONVENTION,
    diff_of_means,
    recommend_layer,
    scalar_range,
    span_means,
    span_token_norms,
    vector_file,
)


def test_span_means_average_only_the_span():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    means = span_means(hidden, [(1, 3), (3, 4)])
    assert torch.allclose(means[0], hidden[0, 1:3].mean(0))
    assert torch.allclose(means[1], hidden[1, 3])


def test_empty_span_is_an_error():
    with pytest.raises(ValueError):
        span_means(torch.zeros(1, 3, 2), [(2, 2)])


def test_token_norms_skip_position_zero():
    hidden = torch.zeros(1, 3, 2)
    hidden[0, 0] = torch.tensor([3.0, 4.0])  # attention sink: must not count
    hidden[0, 1] = torch.tensor([0.0, 1.0])
    norms = span_token_norms(hidden, [(0, 2)])
    assert norms.tolist() == [1.0]


def test_diff_of_means_is_positive_minus_negative():
    pos = torch.ones(3, 2, 4) * 2
    neg = torch.ones(5, 2, 4)
    assert torch.equal(diff_of_means(pos, neg), torch.ones(2, 4))
    with pytest.raises(ValueError):
        diff_of_means(pos[:0], neg)


def test_recommend_layer_stays_in_the_middle_third():
    norms = [100.0] * 3 + [1.0, 5.0, 2.0, 1.0] + [100.0] * 3
    assert recommend_layer(norms, [10.0] * 10) == 4  # band 3..6 of 10 layers


def test_scalar_range_scales_to_the_residual_norm():
    low, default, high = scalar_range(vector_norm=10.0, resid_median=200.0)
    assert (low, default, high) == (1.0, 4.0, 6.0)


def test_vector_file_has_every_layer_and_metadata():
    vectors = torch.randn(6, 4)
    doc = vector_file(
        "sarcasm",
        "m/x",
        vectors,
        [10.0] * 6,
        n_samples={"positive": 2, "negative": 2},
        prompts_sha256="ab",
        description="d",
    )
    assert doc["trait_name"] == "sarcasm" and doc["model_name"] == "m/x"
    assert sorted(doc["vectors"], key=int) == [str(k) for k in range(6)]
    meta = doc["metadata"]
    assert meta["layer_convention"] == LAYER_CONVENTION and meta["judge_used"] is False
    assert meta["hidden_size"] == 4 and meta["n_layers"] == 6 and 2 <= meta["recommended_layer"] <= 4
    lo, hi = meta["recommended_scalar_range"]
    assert lo == -hi and 0 < meta["recommended_scalar"] < hi


def test_pca_recovers_the_main_direction_and_orients_it():
    torch.manual_seed(0)
    points = torch.randn(50, 1) * torch.tensor([[5.0, 0.0, 0.0]]) + torch.randn(50, 3) * 0.1
    components, mean, variance = pca(points, 2)
    assert abs(float(components[0, 0])) > 0.99 and variance[0] > variance[1]
    flipped = orient(components, torch.tensor([-1.0, 0.0, 0.0]))
    assert float(flipped[0, 0]) < 0


def test_axis_tensors_point_to_the_default_assistant():
    default = torch.zeros(3, 2, 4)
    default[..., 0] = 2.0
    roles = torch.randn(5, 2, 4) * 0.01
    t = axis_tensors(default, roles, axis_layer=1, k=2)
    assert t["monitor_direction"][0] > 0.99
    assert float(t["pca_components"][0] @ t["axis"][1]) >= 0
    assert torch.allclose(t["monitor_center"], (default.mean(0)[1] + roles.mean(0)[1]) / 2)


def test_auc():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1], [1]) == 0.5
    assert math.isnan(auc([], [1]))


class _FakePCA:
    components_ = [[1.0, 0.0]]
    mean_ = [0.5, 0.5]
    explained_variance_ = [2.0]


def test_converter_finds_pca_and_contrast_in_several_shapes():
    assert find_pca({"pca": _FakePCA()})["components"].shape == (1, 2)
    assert find_pca({"components": torch.eye(2), "mean": torch.zeros(2)})["explained_variance"].shape == (2,)
    assert find_contrast({0: torch.zeros(2), 1: torch.ones(2)}).shape == (2, 2)
    assert find_contrast({"contrast_vectors": torch.zeros(3, 2)}).shape == (3, 2)
    assert layer_from("pca/roles_layer40-min.pt", {}) == 40


def test_report_flags_looping_samples():
    from infrastructure.persona.report import loops

    assert loops("I'm sorry for your pain. I'm sorry for your pain. I'm sorry for your pain.")
    assert not loops("To make tea, boil water, add a tea bag and wait three minutes.")
