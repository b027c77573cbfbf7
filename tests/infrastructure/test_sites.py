"""Hook names and layer numbers map to decoder-layer sites; bad ones are typed errors naming the field."""

from __future__ import annotations

import pytest
import torch

from infrastructure.errors import HookOutOfRangeError, InvalidHookError, NonFiniteVectorError, VectorShapeError
from infrastructure.steering.sites import EMBEDDINGS_SITE, check_vector, parse_hook


@pytest.mark.parametrize(
    ("hook", "site"),
    [
        ("blocks.5.hook_resid_post", 5),
        ("blocks.5.hook_resid_pre", 4),
        ("blocks.0.hook_resid_pre", EMBEDDINGS_SITE),
        (7, 7),
        ("blocks.29.hook_resid_post", 29),
    ],
)
def test_parse_hook(hook, site):
    assert parse_hook(hook, 30) == site


@pytest.mark.parametrize("hook", ["blocks.5.hook_mlp_out", "layer5", "", "blocks.-1.hook_resid_post", True])
def test_unknown_hooks(hook):
    with pytest.raises(InvalidHookError) as err:
        parse_hook(hook, 30, "vectors.0.hook")
    assert err.value.param == "vectors.0.hook"


@pytest.mark.parametrize("hook", ["blocks.30.hook_resid_post", 30, -1, "blocks.99.hook_resid_pre"])
def test_out_of_range(hook):
    with pytest.raises(HookOutOfRangeError):
        parse_hook(hook, 30)


def test_check_vector():
    assert check_vector(torch.ones(4), 4, "v").shape == (4,)
    with pytest.raises(VectorShapeError):
        check_vector(torch.ones(5), 4, "v")
    with pytest.raises(NonFiniteVectorError):
        check_vector(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 4, "v")
    with pytest.raises(VectorShapeError):
        check_vector(torch.zeros(4), 4, "v", allow_zero=False)
