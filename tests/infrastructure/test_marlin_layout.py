"""Marlin's layout read off a repacking (infrastructure/marlin_layout.py) and the dense route for prefill-sized
products (quant_marlin.MarlinLinear), without a GPU: the library's CUDA repacking is stood in for by one built
here from random permutations of the same shape (per 16 x 64 tile of codes, per 64-output chunk of scales and
zero points), so the probe must find them rather than know them."""

from __future__ import annotations

import pytest
import torch

from infrastructure import marlin_layout, quant_marlin
from infrastructure.quant_gemlite import QuantParts
from infrastructure.quant_marlin import MarlinLinear, pack_words

NATURAL = tuple(range(8))


class FakeRepack:
    """A Marlin-shaped repacking: codes [out, in] -> int32 [in/16, out*2], every tile's 1024 codes in the order
    `tile`; scales and zero points [G, out] with each chunk of 64 in the order `chunk_s` / `chunk_z`. With
    `per_chunk`, the second tile column uses another order (not one permutation: the probe must refuse it)."""

    def __init__(self, seed: int = 0, per_chunk: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.tile = torch.randperm(1024, generator=g)
        self.other = torch.randperm(1024, generator=g) if per_chunk else self.tile
        self.chunk_s = torch.randperm(64, generator=g)
        self.chunk_z = torch.randperm(64, generator=g)

    def __call__(self, codes, zeros, scales, group):
        n, k = codes.shape
        tiles = codes.t().reshape(k // 16, 16, n // 64, 64).permute(0, 2, 1, 3).reshape(k // 16, n // 64, 1024)
        placed = tiles[..., self.tile].clone()
        placed[:, 1::2] = tiles[:, 1::2][..., self.other]
        qweight = pack_words(placed.reshape(k // 16, -1), NATURAL)
        s = scales.t().reshape(-1, n // 64, 64)[..., self.chunk_s].reshape(-1, n).contiguous()
        z = zeros.t().round().to(torch.uint8).reshape(-1, n // 64, 64)[..., self.chunk_z].reshape(-1, n)
        return qweight, s, pack_words(z, NATURAL)


def _parts(out: int, inp: int, group: int, seed: int = 1) -> QuantParts:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out, inp // group), generator=g).to(torch.float16)
    scales = (torch.rand(out, inp // group, generator=g) / 8 + 0.01).to(torch.float16)
    return QuantParts(codes, scales, zeros, None, group)


def test_the_probe_finds_the_permutations_and_the_reference_inverts_them():
    repack = FakeRepack()
    layout = marlin_layout.probe(repack, torch.device("cpu"))
    assert layout is not None
    assert torch.equal(layout.codes[repack.tile], torch.arange(1024, dtype=torch.int32))  # position of each code
    assert torch.equal(layout.scales[repack.chunk_s], torch.arange(64, dtype=torch.int32))
    p = _parts(out=192, inp=256, group=64)
    weight = marlin_layout.dequantise(layout, *repack(p.codes, p.zeros, p.scales, p.group), p.group)
    assert weight.shape == (256, 192) and weight.dtype == torch.float16
    assert torch.equal(weight.t(), p.dequantise(torch.float16))


def test_a_layout_that_differs_between_tiles_is_refused():
    assert marlin_layout.probe(FakeRepack(per_chunk=True), torch.device("cpu")) is None


class _FakeInner(torch.nn.Module):
    """gptqmodel's Marlin module after `post_init`, as far as MarlinLinear reads it: its tensors, and a forward
    (the float32 product) standing for the kernel."""

    def __init__(self, tensors, weight):
        super().__init__()
        self.qweight, self.scales, self.qzeros = tensors
        self.weight = weight

    def forward(self, x):
        return (x.float() @ self.weight.t()).to(x.dtype)


class _MarlinLike(MarlinLinear):
    repack = FakeRepack()

    def pack(self, W_q, scales, zeros, bias=None, fma_mode=False):  # noqa: N803
        parts = QuantParts(W_q, scales, zeros, None, self.group_size)
        self.inner = _FakeInner(self.repack(W_q, zeros, scales, self.group_size), parts.dequantise())
        self.bias = None if bias is None else bias.to(torch.float16)
        self.layout = quant_marlin.dense_layout(self, W_q, scales, zeros, repack=self.repack)
        return self


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(quant_marlin, "_LAYOUTS", {})
    monkeypatch.setattr(quant_marlin, "_CHECKED", {})
    monkeypatch.setattr(quant_marlin, "DENSE_FROM_ROWS", 64)


def test_prefill_sized_products_run_dequantised_and_equal_the_kernels(fresh, monkeypatch):
    p = _parts(out=256, inp=128, group=32, seed=3)
    linear = _MarlinLike(4, p.group, p.in_features, p.out_features).pack(p.codes, p.scales, p.zeros)
    assert linear.layout is not None
    dense = []
    monkeypatch.setattr(_MarlinLike, "dequantised", lambda self: dense.append(1) or MarlinLinear.dequantised(self))
    x = torch.randn(2, 40, p.in_features).to(torch.float16)  # 80 rows: dense
    got = linear(x)
    assert dense and got.shape == (2, 40, p.out_features)
    assert torch.allclose(got.float(), linear.inner(x).float(), atol=2e-2, rtol=1e-2)
    linear(x[:, :8])  # 16 rows: the kernel
    assert len(dense) == 1


def test_a_weight_that_does_not_dequantise_to_its_codes_stays_on_marlin(fresh, monkeypatch):
    p = _parts(out=128, inp=128, group=32, seed=4)
    monkeypatch.setattr(marlin_layout, "dequantise", lambda *a, **k: torch.zeros(128, 128, dtype=torch.float16))
    linear = _MarlinLike(4, p.group, p.in_features, p.out_features).pack(p.codes, p.scales, p.zeros)
    assert linear.layout is None and list(quant_marlin._CHECKED.values()) == [False]


def test_one_group_per_row_stays_on_marlin(fresh):
    p = _parts(out=128, inp=128, group=128, seed=5)
    assert _MarlinLike(4, p.group, p.in_features, p.out_features).pack(p.codes, p.scales, p.zeros).layout is None
