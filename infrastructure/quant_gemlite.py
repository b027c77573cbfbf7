"""AWQ / GPTQ checkpoints repacked at load for GemLite's 4-bit Triton kernels (issue 15, QUANT_KERNEL).

transformers loads an AWQ or GPTQ checkpoint onto gptqmodel's 4-bit modules (`infrastructure/prequantised.py`);
their Triton kernels dequantise inside a GEMM and read the weights at about a tenth of an H200's bandwidth.
GemLite (a maintained Triton library: GEMV / reverse split-K GEMV for one row, split-K GEMM for a few, GEMM for
many) stores HQQ's format, W = (W_q - zeros) * scales per group of `group` inputs, which is AWQ's `(q - z) * s`
and GPTQ's with its zero convention. So after loading, every 4-bit module is unpacked into

* codes  uint8 [out, in] (0..15),
* scales float16 [out, in / group],
* zeros  float16 [out, in / group] (integers; GemLite subtracts them exactly: its `fma_mode=False`),

from the module's own tensors, whatever layout the checkpoint used:

* AWQ "gemm": `qweight` int32 [in, out/8], eight codes per word along the outputs in the nibble order
  0 2 4 6 1 3 5 7; `qzeros` [in/g, out/8] likewise; `scales` [in/g, out];
* AWQ "gemv": `qweight` int32 [out, in/8] in natural order along the inputs; `qzeros` [out, w] and `scales`
  [out, 8w] padded to a width `w` of whole words (only the first in/g columns are groups);
* GPTQ: `qweight` int32 [in/8, out] along the inputs; `qzeros` [in/g, out/8] holding zero - 1 in the v1
  format (gptqmodel converts to v2, the zero itself, at load: `qzero_format()` says which); `g_idx` must be
  `i // g` (act-order checkpoints, `desc_act`, permute the inputs per module: refused, with the reason).

and handed to GemLite's `pack()`; the packed originals are freed layer by layer. Where a decoder layer fits
the fused forward (`engine/fusion.py`), q/k/v and gate/up are concatenated along the outputs into one module
each (groups run along the inputs, which the parts share, so any group size merges), so a layer launches 4
kernels instead of 7; the decoder layers' outputs, where steering acts, are unchanged.

On the CPU (tests, CI) the same parts feed `DequantisedLinear`, which dequantises them once into a float
weight: the repacking, merging and fused forward are exercised without a GPU.
"""

from __future__ import annotations

import gc
import logging
import time
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infrastructure.gemlite_configs import kernel_for

log = logging.getLogger(__name__)

BITS = 4
PACK = 32 // BITS
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ "gemm": nibble k of a word holds code AWQ_ORDER[k] of its eight
LAYOUTS = ("awq-gemm", "awq-gemv", "gptq")
GC_EVERY = 8  # decoder layers converted between garbage collections (convert_model)


class UnsupportedLayout(ValueError):
    """A 4-bit checkpoint GemLite cannot run as it is stored (bits, act-order)."""


@dataclass
class QuantParts:
    """One 4-bit Linear in GemLite's terms: W[o, i] = (codes[o, i] - zeros[o, i // group]) * scales[o, i // group]."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float16 [out, in / group]
    zeros: torch.Tensor  # float16 [out, in / group]
    bias: torch.Tensor | None
    group: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantise(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [out, in] weight these parts stand for."""
        zeros = self.zeros.float().repeat_interleave(self.group, 1)
        scales = self.scales.float().repeat_interleave(self.group, 1)
        return ((self.codes.float() - zeros) * scales).to(dtype)

    @staticmethod
    def cat(parts: list[QuantParts]) -> QuantParts:
        """Several Linears over the same inputs as one: outputs concatenated (q/k/v, gate/up)."""
        first = parts[0]
        if any(p.in_features != first.in_features or p.group != first.group for p in parts):
            raise UnsupportedLayout("merged projections need the same inputs and group size")
        biases = [p.bias for p in parts]
        if any(b is not None for b in biases):
            biases = [b if b is not None else p.codes.new_zeros(p.out_features, dtype=torch.float16)
                      for b, p in zip(biases, parts)]  # fmt: skip
            bias = torch.cat(biases)
        else:
            bias = None
        return QuantParts(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.zeros for p in parts]),
            bias,
            first.group,
        )


def nibbles(words: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """uint8 codes of int32 words along the last dimension: [..., n] -> [..., 8n], code j of each word at
    position j (`order`: the code stored at nibble k is order[k]; natural order when None)."""
    shifts = torch.arange(0, 32, BITS, device=words.device, dtype=torch.int32)
    codes = ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)  # [..., n, 8]: nibble k
    if order is not None:
        codes = codes[..., [order.index(j) for j in range(PACK)]]
    return codes.flatten(-2)


def unpack_awq_gemm(qweight, qzeros, scales, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [out, in], zeros [out, G], scales [out, G]) of AutoAWQ's "gemm" tensors."""
    codes = nibbles(qweight, AWQ_ORDER).t().contiguous()
    zeros = nibbles(qzeros, AWQ_ORDER).t().to(torch.float16).contiguous()
    return codes, zeros, scales.t().to(torch.float16).contiguous()


def unpack_awq_gemv(qweight, qzeros, scales, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, zeros, scales) of AutoAWQ's "gemv" tensors (zeros and scales padded to whole words)."""
    codes = nibbles(qweight).contiguous()
    groups = codes.shape[1] // group
    zeros = nibbles(qzeros)[:, :groups].to(torch.float16).contiguous()
    return codes, zeros, scales[:, :groups].to(torch.float16).contiguous()


def unpack_gptq(qweight, qzeros, scales, group: int, g_idx=None, zero_offset: int = 1):
    """(codes, zeros, scales) of GPTQ tensors; `zero_offset` 1 for the v1 format (stored zero - 1), 0 for v2."""
    codes = nibbles(qweight.t().contiguous()).contiguous()
    if g_idx is not None:
        check_natural_groups(g_idx, group)
    zeros = (nibbles(qzeros).to(torch.int16) + zero_offset).t().to(torch.float16).contiguous()
    return codes, zeros, scales.t().to(torch.float16).contiguous()


def check_natural_groups(g_idx: torch.Tensor, group: int) -> None:
    """GemLite's groups are runs of `group` inputs: refuse a GPTQ act-order module (`desc_act`: g_idx permuted)."""
    natural = torch.arange(g_idx.numel(), device=g_idx.device, dtype=torch.long) // group
    if not torch.equal(g_idx.long(), natural):
        raise UnsupportedLayout(
            "GPTQ act-order (desc_act) checkpoint: its inputs are permuted per module, which GemLite's grouped "
            "layout does not take; serve it with QUANT_KERNEL=triton"
        )


def _group(module: nn.Module) -> int:
    group = int(getattr(module, "group_size", -1))
    return module.in_features if group in (-1, 0) else group


def layout_of(method: str, config_q: Any) -> str:
    """The checkpoint's layout from its quantization config (dict or transformers' config object)."""
    values = dict(config_q) if isinstance(config_q, dict) else config_q.to_dict()
    if int(values.get("bits", BITS)) != BITS:
        raise UnsupportedLayout(f"{values.get('bits')}-bit {method} checkpoint: GemLite runs 4-bit AWQ / GPTQ")
    if method == "gptq":
        return "gptq"
    version = str(values.get("version", "gemm")).lower().rsplit(".", 1)[-1]
    if version not in ("gemm", "gemv"):
        raise UnsupportedLayout(f"AWQ version {version!r}: GemLite takes the gemm and gemv layouts")
    return f"awq-{version}"


def is_quantised(m: object) -> bool:
    """A 4-bit module with packed tensors (gptqmodel's AWQ / GPTQ linears) and no hooks of its own."""
    return (
        isinstance(m, nn.Module)
        and all(isinstance(getattr(m, name, None), torch.Tensor) for name in ("qweight", "qzeros", "scales"))
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


def parts_of(module: nn.Module, layout: str) -> QuantParts:
    """A gptqmodel 4-bit module's weights as GemLite parts (on the module's device)."""
    if int(getattr(module, "bits", BITS)) != BITS:
        raise UnsupportedLayout(f"{module.bits}-bit module: GemLite runs 4-bit weights here")
    group = _group(module)
    q, z, s = module.qweight, module.qzeros, module.scales
    if layout == "awq-gemm":
        codes, zeros, scales = unpack_awq_gemm(q, z, s, group)
    elif layout == "awq-gemv":
        codes, zeros, scales = unpack_awq_gemv(q, z, s, group)
    else:
        fmt = module.qzero_format() if callable(getattr(module, "qzero_format", None)) else 1
        codes, zeros, scales = unpack_gptq(q, z, s, group, getattr(module, "g_idx", None), 1 if fmt == 1 else 0)
    bias = getattr(module, "bias", None)
    bias = bias.detach().to(torch.float16) if isinstance(bias, torch.Tensor) else None
    return QuantParts(codes, scales, zeros, bias, group)


class DequantisedLinear(nn.Module):
    """The CPU stand-in for a GemLite linear: the same constructor and `pack()` call, weights dequantised once
    into a float32 matrix (the model's dtype at forward). It runs the repacking and the merged layers on
    machines without Triton and CUDA (tests, CI); it saves no memory and no time."""

    def __init__(self, W_nbits, group_size, in_features, out_features, input_dtype=None, output_dtype=None):  # noqa: N803
        super().__init__()
        self.group_size, self.in_features, self.out_features = group_size, in_features, out_features

    def pack(self, W_q, scales, zeros, bias=None, fma_mode=True):  # noqa: N803 - GemLite's signature
        parts = QuantParts(W_q, scales, zeros, bias, self.group_size)
        self.register_buffer("weight_f", parts.dequantise(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_f.to(x.dtype), bias)


def gemlite_class():
    """GemLite's linear (needs CUDA and Triton: imported only on a GPU)."""
    from gemlite import GemLiteLinear

    return GemLiteLinear


def gemlite_available() -> bool:
    try:
        import gemlite  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present without a usable CUDA / Triton
        return False
    return True


def build_linear(parts: QuantParts, cls) -> nn.Module:
    """One packed module of `cls` (GemLite's linear, quant_marlin.MarlinLinear or DequantisedLinear) from parts,
    float16 activations."""
    kwargs: dict[str, Any] = {}
    gemlite = cls.__module__.startswith("gemlite")
    if gemlite:
        from gemlite import DType

        kwargs = {"input_dtype": DType.FP16, "output_dtype": DType.FP16}
    linear = cls(
        W_nbits=BITS, group_size=parts.group, in_features=parts.in_features, out_features=parts.out_features, **kwargs
    )
    linear.pack(parts.codes, parts.scales, parts.zeros, bias=parts.bias, fma_mode=False)
    if gemlite:  # our kernel choice per row count (gemlite_configs.kernel_for)
        linear.forward = types.MethodType(_routed_forward, linear)
    return linear


def _routed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """GemLite's forward with the kernel `gemlite_configs.kernel_for` picks for this many rows."""
    return self.forward_manual(x, kernel_for(x.numel() // x.shape[-1]))


def convert_model(model: nn.Module, layout: str, cls=None) -> dict[str, int]:
    """Replace every 4-bit module of `model` by a `cls` linear (GemLite's by default), merging q/k/v and gate/up
    of every decoder layer the fused forward fits. Returns counts (modules made, layers fused). Raises
    UnsupportedLayout before changing anything when a module cannot be repacked. No reference to a replaced
    module outlives its layer's turn, so the GPU holds the packed weights about once, not twice (a 70B AWQ
    model: 40 GB, not 80); gptqmodel's GPTQ modules are in reference cycles, which a collection every
    GC_EVERY layers and one at the end free (without it a 7B GPTQ model held 3.4 GB more after loading)."""
    from infrastructure.engine.fusion import _fuse_layer, attention_inputs, attention_output_and_mlp, fusable
    from infrastructure.steering.sites import decoder_layers

    if layout not in LAYOUTS:
        raise UnsupportedLayout(f"unknown 4-bit layout {layout}")
    cls = cls or gemlite_class()
    for m in model.modules():  # every module is checked (bits, act-order) before anything is replaced
        if not is_quantised(m):
            continue
        if int(getattr(m, "bits", BITS)) != BITS:
            raise UnsupportedLayout(f"{m.bits}-bit module: GemLite runs 4-bit weights here")
        if layout == "gptq" and getattr(m, "g_idx", None) is not None:
            check_natural_groups(m.g_idx, _group(m))
    del m
    started = time.perf_counter()
    counts = {"modules": 0, "fused_layers": 0, "replaced": 0}
    made: set[int] = set()  # the new modules and theirs (Marlin's wraps one with 4-bit tensors: not to convert)

    def make(modules: list[nn.Module]) -> nn.Module:
        counts["modules"] += 1
        counts["replaced"] += len(modules)
        parts = [parts_of(m, layout) for m in modules]
        linear = build_linear(QuantParts.cat(parts) if len(parts) > 1 else parts[0], cls)
        made.update(id(m) for m in linear.modules())
        return linear

    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            if i % GC_EVERY == GC_EVERY - 1:
                gc.collect()  # gptqmodel's GPTQ modules sit in reference cycles: freed by the collector, not on release
            if fusable(layer, linear_ok=is_quantised):
                layer.self_attn.o_proj = make([layer.self_attn.o_proj])
                layer.mlp.down_proj = make([layer.mlp.down_proj])
                _fuse_layer(layer, attention_inputs, attention_output_and_mlp, merge=make)
                counts["fused_layers"] += 1
        left = [name for name, m in model.named_modules() if is_quantised(m) and id(m) not in made]  # unfused, others
        for name in left:
            owner, _, attr = name.rpartition(".")
            parent = model.get_submodule(owner) if owner else model
            setattr(parent, attr, make([getattr(parent, attr)]))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    log.info("repacked %d 4-bit modules (%s) into %d %s modules, %d layers fused, in %.1f s", counts["replaced"],
             layout, counts["modules"], cls.__name__, counts["fused_layers"], seconds)  # fmt: skip
    return counts
