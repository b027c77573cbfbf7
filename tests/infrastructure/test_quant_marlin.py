"""Marlin's side of the 4-bit repacking (infrastructure/quant_marlin.py), without a GPU: parts packed back into
AutoAWQ's "gemm" tensors unpack to the same parts, and QUANT_KERNEL chooses Marlin as documented."""

from __future__ import annotations

import pytest
import torch

from infrastructure import quant_marlin
from infrastructure.prequantised import prequantised_kwargs, resolve_kernel
from infrastructure.quant_gemlite import unpack_awq_gemm
from infrastructure.quant_marlin import MarlinLinear, pack_awq_gemm, pack_words

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}


def test_parts_packed_for_marlin_unpack_to_the_same_parts():
    g = torch.Generator().manual_seed(0)
    out, inp, group = 48, 64, 32
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out, inp // group), generator=g).to(torch.float16)
    scales = torch.rand(out, inp // group, generator=g).to(torch.float16)
    packed = pack_awq_gemm(codes, zeros, scales)
    assert packed["qweight"].shape == (inp, out // 8) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (inp // group, out // 8) and packed["scales"].shape == (inp // group, out)
    back = unpack_awq_gemm(packed["qweight"], packed["qzeros"], packed["scales"], group)
    for got, want in zip(back, (codes, zeros, scales)):
        assert torch.equal(got, want)


def test_a_word_holds_its_codes_in_the_order_given():
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    assert pack_words(codes, tuple(range(8))).item() == 0x76543210
    assert pack_words(codes, (0, 2, 4, 6, 1, 3, 5, 7)).item() == 0x75316420


def test_marlin_takes_four_bit_weights_only():
    with pytest.raises(ValueError, match="4-bit"):
        MarlinLinear(8, 128, 64, 64)


def test_auto_takes_marlin_once_it_is_built(monkeypatch):
    monkeypatch.setattr(quant_marlin, "marlin_built", lambda: True)
    assert resolve_kernel("awq", AWQ, "cuda", "auto") == "marlin"
    assert resolve_kernel("gptq", {"bits": 4, "group_size": 128, "desc_act": True}, "cuda", "auto") == "triton"
    assert resolve_kernel("awq", AWQ, "cpu", "auto") == "library"
    monkeypatch.setattr(quant_marlin, "marlin_built", lambda: False)
    assert resolve_kernel("awq", AWQ, "cuda", "auto") in ("gemlite", "triton")
    assert resolve_kernel("awq", AWQ, "cuda", "marlin") == "marlin"


def test_marlin_loads_onto_the_layouts_own_modules_to_be_repacked():
    pytest.importorskip("gptqmodel", reason="AWQ/GPTQ kernels: gptqmodel comes with the locked packages")
    config = prequantised_kwargs("awq", AWQ, "cuda", "marlin")["quantization_config"]
    assert config.backend in ("gemm_triton", "gemv")  # the Triton module, never run: repacked after loading


class _PackedInner(torch.nn.Module):
    """Like gptqmodel's Marlin module after `post_init`: 4-bit tensors under the names gptqmodel uses."""

    def __init__(self, tensors: dict, weight: torch.Tensor):
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(name, value)
        self.register_buffer("weight_f", weight)

    def forward(self, x):
        return x @ self.weight_f.t().to(x.dtype)


class _MarlinLike(MarlinLinear):
    """MarlinLinear with the library's module replaced by `_PackedInner` (no CUDA here)."""

    def pack(self, W_q, scales, zeros, bias=None, fma_mode=False):  # noqa: N803
        from infrastructure.quant_gemlite import QuantParts

        weight = QuantParts(W_q, scales, zeros, None, self.group_size).dequantise()
        self.inner = _PackedInner(pack_awq_gemm(W_q, zeros, scales), weight)
        return self


def test_a_model_repacked_for_marlin_converts_each_module_once():
    from infrastructure.quant_gemlite import convert_model
    from tests.infrastructure.test_quant_gemlite import _awq_llama

    model = _awq_llama(2)
    model.model.layers[1].mlp.register_forward_hook(lambda *args: None)  # unfused: converted one for one
    ids = torch.tensor([[1, 20, 33, 120, 7, 99]])
    with torch.no_grad():
        before = model(ids).logits
    counts = convert_model(model, "awq-gemm", _MarlinLike)
    assert counts == {"modules": 4 + 7, "fused_layers": 1, "replaced": 14}  # the new modules' tensors left alone
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5, rtol=1e-5)
