"""Steering math and hook plumbing on tiny tensors and a tiny model built from a config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infrastructure.steering.hooks import BatchSteering, HookSet, build_tables, make_site_hook, our_hooks
from infrastructure.steering.spec import Capture, SteeringSpec, add_op, cap_op

H = 4


def _tables(specs, captures=None):
    captures = captures or [()] * len(specs)
    return build_tables(specs, captures, H, lambda site: torch.device("cpu"), torch.float32)


def _apply(tables, site, hidden, mask=None):
    state = BatchSteering(tables)
    shape = (hidden[0] if isinstance(hidden, tuple) else hidden).shape[:2]
    state.set_mask(mask if mask is not None else torch.ones(shape, dtype=torch.bool))
    return make_site_hook(site, tables[site], state)(None, (), hidden), state


def test_add_applies_per_row_and_leaves_other_rows_identical():
    v = torch.tensor([1.0, 0.0, 2.0, 0.0])
    tables = _tables([SteeringSpec((add_op(3, v, 0.5),)), None])
    hidden = torch.randn(2, 5, H)
    out, _ = _apply(tables, 3, hidden.clone())
    assert torch.equal(out[1], hidden[1])
    assert torch.allclose(out[0], hidden[0] + 0.5 * v)


def test_two_adds_at_one_site_sum_and_normalise():
    v = torch.tensor([3.0, 4.0, 0.0, 0.0])
    spec = SteeringSpec((add_op(1, v, 2.0, normalize=True), add_op(1, v, 1.0)))
    out, _ = _apply(_tables([spec]), 1, torch.zeros(1, 2, H))
    assert torch.allclose(out[0, 0], torch.tensor([1.2 + 3.0, 1.6 + 4.0, 0.0, 0.0]))


def test_cap_clamps_projection_only_above_tau():
    u = torch.tensor([1.0, 0.0, 0.0, 0.0])
    tables = _tables([SteeringSpec((cap_op(0, u * 7, 2.0),))])
    hidden = torch.tensor([[[5.0, 1.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0], [-4.0, 0.0, 1.0, 0.0]]])
    out, _ = _apply(tables, 0, hidden.clone())
    assert out[0, :, 0].tolist() == [2.0, 1.0, -4.0]  # capped at tau, untouched below
    assert torch.equal(out[..., 1:], hidden[..., 1:])  # orthogonal part unchanged


def test_mask_limits_positions():
    v = torch.ones(H)
    hidden = torch.zeros(1, 3, H)
    mask = torch.tensor([[True, False, True]])
    out, _ = _apply(_tables([SteeringSpec((add_op(0, v, 1.0),))]), 0, hidden, mask)
    assert out[0, :, 0].tolist() == [1.0, 0.0, 1.0]


def test_capture_records_projection_after_steering():
    d = torch.tensor([0.0, 1.0, 0.0, 0.0])
    tables = _tables([SteeringSpec((add_op(2, d, 3.0),))], [(Capture("p", 2, d),)])
    hidden = torch.zeros(1, 2, H)
    _, state = _apply(tables, 2, hidden)
    assert state.captured[(2, 0)].tolist() == [[3.0, 3.0]]


def test_tuple_outputs_are_supported():
    tables = _tables([SteeringSpec((add_op(0, torch.ones(H), 1.0),))])
    out, _ = _apply(tables, 0, (torch.zeros(1, 1, H), "extra"))
    assert isinstance(out, tuple) and out[1] == "extra" and out[0].sum() == H


class _Tiny(nn.Module):
    """Just enough of a decoder for site lookup: embeddings and a ModuleList of layers."""

    def __init__(self, n_layers=3):
        super().__init__()
        self.embed = nn.Embedding(10, H)
        self.layers = nn.ModuleList(nn.Linear(H, H) for _ in range(n_layers))

    def get_input_embeddings(self):
        return self.embed

    def get_decoder(self):
        return self


def test_hookset_registers_all_or_nothing():
    model = _Tiny()
    v = torch.ones(H)
    tables = _tables([SteeringSpec((add_op(0, v, 1.0), add_op(1, v, 1.0), add_op(7, v, 1.0)))])
    with pytest.raises(IndexError):  # site 7 does not exist: the hooks already placed are rolled back
        with HookSet(model, BatchSteering(tables)):
            pass
    assert our_hooks(model) == []


def test_hookset_removes_its_hooks_after_an_exception():
    model = _Tiny()
    tables = _tables([SteeringSpec((add_op(-1, torch.ones(H), 1.0), add_op(2, torch.ones(H), 1.0)))])
    with pytest.raises(RuntimeError):
        with HookSet(model, BatchSteering(tables)):
            assert sorted(our_hooks(model)) == ["embed", "layers.2"]
            raise RuntimeError("fault")
    assert our_hooks(model) == []


def test_ortho_scales_only_the_component_along_u():
    from infrastructure.steering.spec import ortho_op

    v = torch.tensor([0.0, 2.0, 0.0, 0.0])  # u = e1 after normalising
    hidden = torch.tensor([[[1.0, 3.0, -1.0, 2.0], [0.5, -2.0, 4.0, 0.0]]])
    for c in (0.0, 1.0, 2.5, -1.0):
        out, _ = _apply(_tables([SteeringSpec((ortho_op(2, v, c),)), None]), 2, torch.cat([hidden, hidden]))
        expected = hidden.clone()
        expected[..., 1] *= c  # h - (h.u)u + c(h.u)u
        assert torch.allclose(out[0], expected[0]), c
        assert torch.equal(out[1], hidden[0])  # the unsteered row is untouched


def test_ortho_matches_the_projector_formula_for_any_direction():
    from infrastructure.steering.spec import ortho_op

    g = torch.Generator().manual_seed(3)
    v, hidden = torch.randn(H, generator=g), torch.randn(1, 3, H, generator=g)
    u = v / v.norm()
    out, _ = _apply(_tables([SteeringSpec((ortho_op(0, v, 0.25),))]), 0, hidden.clone())
    along = (hidden @ u).unsqueeze(-1)
    assert torch.allclose(out, hidden - along * u + 0.25 * along * u, atol=1e-6)
