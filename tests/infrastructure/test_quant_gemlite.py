"""GemLite repacking (infrastructure/quant_gemlite.py): AWQ gemm / gemv and GPTQ tensors unpack to exactly the
codes, zeros and scales they were packed from; merged projections are the parts' outputs concatenated; a model
whose 4-bit modules are repacked (and its layers fused) computes what its dequantised weights compute. GemLite's
own kernels need CUDA and Triton: on the CPU its dequantising stand-in takes the packed parts (the GPU rows are
in the README, measured on an H200)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infrastructure.engine.fusion import FUSED_MARK
from infrastructure.prequantised import prequantised_kwargs, resolve_kernel
from infrastructure.quant_gemlite import (
    DequantisedLinear,
    QuantParts,
    UnsupportedLayout,
    build_linear,
    convert_model,
    layout_of,
    unpack_awq_gemm,
    unpack_awq_gemv,
    unpack_gptq,
)
from scripts.quantized_layout import pack_awq, pack_awq_gemv, pack_gptq, quantize, unpack_awq
from scripts.quantized_layout import unpack_gptq as deq_gptq

GROUP = 128


def _weights(out_f: int = 96, in_f: int = 384, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_awq_gemm_and_gemv_unpack_to_the_packed_codes_zeros_and_scales():
    codes, zeros, scales = quantize(_weights(), GROUP, symmetric=False)
    for unpack, packed in ((unpack_awq_gemm, pack_awq(codes, zeros, scales)),
                           (unpack_awq_gemv, pack_awq_gemv(codes, zeros, scales))):  # fmt: skip
        got_codes, got_zeros, got_scales = unpack(packed["qweight"], packed["qzeros"], packed["scales"], GROUP)
        assert got_codes.dtype == torch.uint8 and got_codes.shape == (96, 384)
        assert torch.equal(got_codes.int(), codes)
        assert torch.equal(got_zeros, zeros.half()) and torch.equal(got_scales, scales)
    packed = pack_awq(codes, zeros, scales)
    got_codes, got_zeros, got_scales = unpack_awq_gemm(packed["qweight"], packed["qzeros"], packed["scales"], GROUP)
    parts = QuantParts(got_codes, got_scales, got_zeros, None, GROUP)
    assert torch.equal(parts.dequantise(), unpack_awq(packed, GROUP))  # the checkpoint tests' reference weight


def test_gptq_unpack_v1_and_v2_zeros_and_refuses_act_order():
    codes, zeros, scales = quantize(_weights(seed=1), GROUP, symmetric=True)
    packed = pack_gptq(codes, zeros, scales, GROUP)  # v1: qzeros hold zero - 1
    got_codes, got_zeros, got_scales = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], GROUP,
                                                   packed["g_idx"], zero_offset=1)  # fmt: skip
    assert torch.equal(got_codes.int(), codes) and torch.equal(got_zeros, zeros.half())
    assert torch.equal(got_scales, scales)
    assert torch.equal(QuantParts(got_codes, got_scales, got_zeros, None, GROUP).dequantise(), deq_gptq(packed))
    v2 = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], GROUP, zero_offset=0)[1]
    assert torch.equal(v2 + 1, zeros.half())  # v2 stores the zero itself
    shuffled = packed["g_idx"][torch.randperm(384, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(UnsupportedLayout, match="act-order"):
        unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], GROUP, shuffled)


def test_merged_parts_are_the_outputs_concatenated():
    parts = []
    for seed, out_f in ((2, 128), (3, 32), (4, 32)):  # q, k, v of a grouped-query layer
        c, z, s = quantize(_weights(out_f, 256, seed), GROUP, symmetric=False)
        bias = torch.randn(out_f, generator=torch.Generator().manual_seed(seed)).half() if seed != 3 else None
        parts.append(QuantParts(c.to(torch.uint8), s, z.half(), bias, GROUP))
    merged = QuantParts.cat(parts)
    assert merged.codes.shape == (192, 256) and merged.scales.shape == merged.zeros.shape == (192, 2)
    assert torch.equal(merged.dequantise(), torch.cat([p.dequantise() for p in parts]))
    assert torch.equal(merged.bias[128:160], torch.zeros(32, dtype=torch.float16))  # k had none
    x = torch.randn(3, 256)
    whole = build_linear(merged, DequantisedLinear)(x)
    pieces = torch.cat([build_linear(p, DequantisedLinear)(x) for p in parts], dim=-1)
    assert torch.allclose(whole, pieces, atol=1e-6)
    with pytest.raises(UnsupportedLayout):
        QuantParts.cat([parts[0], QuantParts(parts[1].codes, parts[1].scales, parts[1].zeros, None, 64)])


class _FakeAwq(nn.Module):
    """A gptqmodel-like AWQ gemm module: packed tensors as buffers, forward through the dequantised weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.bits = (
            linear.in_features,
            linear.out_features,
            128,
            4,
        )
        codes, zeros, scales = quantize(linear.weight.data, GROUP, symmetric=False)
        for name, value in pack_awq(codes, zeros, scales).items():
            self.register_buffer(name, value)
        self.bias = None

    def forward(self, x):
        return x @ unpack_awq({"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}, 128).t()


def _awq_llama(layers: int) -> nn.Module:
    """A small random Llama whose projections are AWQ-packed modules (as transformers loads a checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=300)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):  # fmt: skip
            for name in names:
                setattr(owner, name, _FakeAwq(getattr(owner, name)))
    return model


def test_convert_model_repacks_merges_and_matches_the_dequantised_model():
    model = _awq_llama(2)
    model.model.layers[1].mlp.register_forward_hook(lambda *args: None)  # a hooked layer is not fused
    ids = torch.tensor([[1, 20, 33, 120, 7, 99]])
    with torch.no_grad():
        before = model(ids).logits
    counts = convert_model(model, "awq-gemm", DequantisedLinear)
    assert counts == {"modules": 4 + 7, "fused_layers": 1, "replaced": 14}  # fused: 4 modules instead of 7
    assert isinstance(model.model.layers[1].self_attn.q_proj, DequantisedLinear)  # unfused: one for one
    layer = model.model.layers[0]
    assert getattr(layer, FUSED_MARK) is not None and not hasattr(layer.self_attn, "q_proj")
    assert isinstance(layer.self_attn.qkv_proj, DequantisedLinear) and layer.self_attn.qkv_proj.out_features == 512
    assert layer.mlp.gate_up_proj.out_features == 1024
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)


def test_compiled_4bit_layers_compile_the_pieces_between_the_products_once():
    """COMPILE=on over repacked 4-bit layers: the products stay the modules' own kernels, the norms, rotary,
    residual and SiLU·up run as compiled pieces shared by every layer (4 graphs, then one more each when the
    token count turns dynamic, however many layers), and the logits equal the eager fused model's."""
    from infrastructure.engine.fusion import AroundProducts, fuse_model

    compiles: list = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    model = _awq_llama(3)
    assert convert_model(model, "awq-gemm", DequantisedLinear)["fused_layers"] == 3
    short, long = torch.tensor([[1, 20, 33, 120, 7, 99]]), torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        eager = [model(ids).logits for ids in (short, long)]
        assert fuse_model(model, compile=True, backend=counting) == 3
        fused = getattr(model.model.layers[0], FUSED_MARK)
        assert isinstance(fused.pre.__self__, AroundProducts)  # not the whole-layer functions: modules inside
        compiled = [model(ids).logits for ids in (short, long)]
        assert len(compiles) == 8  # 4 pieces, each once static and once dynamic in the token count
        model(torch.tensor([[3, 4, 5]]))
    assert len(compiles) == 8
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_choice_and_loading_backend(monkeypatch):
    import infrastructure.quant_gemlite as qg

    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    assert resolve_kernel("awq", awq, "cpu", "auto") == "library"
    monkeypatch.setattr(qg, "gemlite_available", lambda: False)
    assert resolve_kernel("awq", awq, "cuda", "auto") == "triton"
    monkeypatch.setattr(qg, "gemlite_available", lambda: True)
    assert resolve_kernel("awq", awq, "cuda", "auto") == "gemlite"
    assert resolve_kernel("gptq", gptq | {"desc_act": True}, "cuda", "auto") == "triton"
    assert resolve_kernel("awq", awq | {"bits": 8}, "cuda", "auto") == "triton"
    assert resolve_kernel("awq", awq, "cuda", "triton") == "triton"
    backend = lambda m, c, d: prequantised_kwargs(m, c, d, "gemlite")["quantization_config"].backend  # noqa: E731
    assert backend("awq", awq, "cuda") == "gemm_triton" and backend("gptq", gptq, "cuda") == "triton"
    assert backend("awq", awq | {"version": "gemv"}, "cuda") == "gemv"
    assert backend("awq", awq, "cpu") == "torch_awq" and backend("gptq", gptq, "cpu") == "torch"
    assert layout_of("awq", awq | {"version": "GEMV"}) == "awq-gemv" and layout_of("gptq", gptq) == "gptq"
    with pytest.raises(UnsupportedLayout):
        layout_of("awq", awq | {"version": "exllama"})


def test_gemlite_configs_fill_every_bucket_from_the_nearest_measured_signature():
    from infrastructure.gemlite_configs import fill_missing, needed, signature, slug

    kernel_for = lambda rows: "GEMV_REVSPLITK" if rows <= 4 else ("GEMM_SPLITK" if rows < 64 else "GEMM")  # noqa: E731
    bucket = lambda rows: 1 << (rows - 1).bit_length()  # noqa: E731 - powers of two, as GemLite's lookup starts
    buckets = needed(128, bucket, kernel_for)
    assert buckets == {"GEMV_REVSPLITK": [1, 2, 4], "GEMM_SPLITK": [8, 16, 32, 64], "GEMM": [64, 128]}
    cache = {
        "GEMV_REVSPLITK": {
            signature(1, 4096, 4096, 128): {"BLOCK_SIZE_N": 128},
            signature(1, 28672, 4096, 128): {"n": 1},
        },
        "GEMM_SPLITK": {signature(16, 4096, 14336, 128): {"k": 1}, signature(64, 4096, 4096, 128): {"k": 2}},
        "GEMM": {signature(128, 4096, 4096, 64): {"group": 64}},
    }
    shapes = {(8192, 8192, 128), (8192, 28672, 128)}
    added = fill_missing(cache, shapes, buckets)
    assert added == 2 * (3 + 4 + 2)
    assert cache["GEMV_REVSPLITK"][signature(2, 8192, 28672, 128)] == {"BLOCK_SIZE_N": 128}  # nearest K and N
    assert cache["GEMM_SPLITK"][signature(8, 8192, 28672, 128)] == {"k": 1}  # nearest rows bucket first: 16
    assert cache["GEMM_SPLITK"][signature(64, 8192, 8192, 128)] == {"k": 2}
    assert cache["GEMM"][signature(64, 8192, 8192, 128)] == {"group": 64}  # another group when none matches
    assert fill_missing(cache, shapes, buckets) == 0  # measured and filled signatures are kept
    assert slug("NVIDIA H200") == "nvidia_h200"


def test_configs_are_fitted_to_k_and_64_rows_run_split_k():
    from infrastructure.gemlite_configs import fit_k, kernel_for, signature

    cache = {
        "GEMM_SPLITK": {signature(16, 1024, 256, 128): {"BLOCK_SIZE_K": 128, "SPLIT_K": 4},  # 512 > K: past the end
                        signature(16, 8192, 8192, 128): {"BLOCK_SIZE_K": 128, "SPLIT_K": 8},  # tiles 8192 already
                        signature(16, 4096, 3584, 128): {"BLOCK_SIZE_K": 128, "SPLIT_K": 8}},  # 3584 = 7 x 512
        "GEMV_REVSPLITK": {signature(1, 1024, 256, 128): {"BLOCK_SIZE_K": 256}},
        "GEMM": {signature(64, 1024, 96 * 4, 128): {"BLOCK_SIZE_K": 256}, signature(64, 9, 9, 128): {"x": 1}},
    }  # fmt: skip
    shapes = {(1024, 256, 128), (8192, 8192, 128), (4096, 3584, 128), (1024, 384, 128)}
    assert fit_k(cache, shapes) == 4
    assert cache["GEMM_SPLITK"][signature(16, 1024, 256, 128)] == {"BLOCK_SIZE_K": 128, "SPLIT_K": 2}
    assert cache["GEMM_SPLITK"][signature(16, 8192, 8192, 128)] == {"BLOCK_SIZE_K": 128, "SPLIT_K": 8}
    assert cache["GEMM_SPLITK"][signature(16, 4096, 3584, 128)] == {"BLOCK_SIZE_K": 128, "SPLIT_K": 4}
    assert cache["GEMV_REVSPLITK"][signature(1, 1024, 256, 128)] == {"BLOCK_SIZE_K": 128}  # two halves of K
    assert cache["GEMM"][signature(64, 1024, 384, 128)] == {"BLOCK_SIZE_K": 128}
    assert [kernel_for(rows) for rows in (1, 4, 5, 63, 64, 65)] == ["GEMV_REVSPLITK"] * 2 + ["GEMM_SPLITK"] * 3 + [
        "GEMM"
    ]
