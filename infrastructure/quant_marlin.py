"""4-bit layers on gptqmodel's Marlin kernel (QUANT_KERNEL=marlin; `auto` once the kernel is built).

Marlin (IST Austria's mixed-precision GEMM, as gptqmodel ships it: CUDA C++ compiled with nvcc on first use,
minutes, then cached under GPTQMODEL_TORCH_EXTENSIONS_DIR) reads 4-bit weights at 2.2–2.9 TB/s for one decode
row on an H200 and keeps tensor cores busy at 64 rows, where GemLite's Triton kernels reach 1.6–1.8 and
0.5–0.7 TB/s (`scripts/bench_gemlite.py --marlin`, docs/bench/issue15_h200_marlin_gemm.json).

The checkpoint loads as for GemLite (`infrastructure/quant_gemlite.py`): onto gptqmodel's Triton modules, then
every module is unpacked into (codes, scales, zeros) parts, q/k/v and gate/up merged where the layer fuses.
`MarlinLinear` takes those parts through GemLite's constructor and `pack()` signature, packs them back into
AutoAWQ's "gemm" layout (which holds any zero point, so AWQ and GPTQ checkpoints alike) and hands them to
gptqmodel's `AwqMarlinLinear`, whose `post_init` repacks them for the kernel. The decoder layers then run the
fused forward with compiled pieces between the products, as with GemLite.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from infrastructure.quant_gemlite import AWQ_ORDER, BITS, PACK

log = logging.getLogger(__name__)


def pack_words(codes: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 words of 4-bit codes [..., 8n] -> [..., n]: nibble k of word w holds code order[k] of its eight."""
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, PACK)
    words = torch.zeros(grouped.shape[:-1], dtype=torch.int32, device=codes.device)
    for k, j in enumerate(order):
        words |= grouped[..., j] << (BITS * k)
    return words


def pack_awq_gemm(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ's "gemm" tensors of parts (the inverse of `quant_gemlite.unpack_awq_gemm`)."""
    return {
        "qweight": pack_words(codes.t().contiguous(), AWQ_ORDER),  # [in, out/8]
        "qzeros": pack_words(zeros.t().round().to(torch.uint8).contiguous(), AWQ_ORDER),  # [groups, out/8]
        "scales": scales.t().to(torch.float16).contiguous(),  # [groups, out]
    }


class MarlinLinear(nn.Module):
    """A 4-bit linear on gptqmodel's Marlin kernel, built like a GemLite linear (`quant_gemlite.build_linear`):
    the constructor, then `pack(codes, scales, zeros, bias)`. float16 activations."""

    def __init__(self, W_nbits, group_size, in_features, out_features, input_dtype=None, output_dtype=None):  # noqa: N803
        super().__init__()
        if W_nbits != BITS:
            raise ValueError(f"{W_nbits}-bit weights: Marlin runs 4-bit weights here")
        self.group_size, self.in_features, self.out_features = group_size, in_features, out_features
        self.inner: nn.Module | None = None

    def pack(self, W_q, scales, zeros, bias=None, fma_mode=False):  # noqa: N803 - GemLite's signature
        tensors = pack_awq_gemm(W_q, zeros, scales)
        self.inner = awq_marlin_module(tensors, self.in_features, self.out_features, self.group_size, bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def awq_marlin_module(tensors: dict[str, torch.Tensor], in_features: int, out_features: int, group: int, bias=None):
    """gptqmodel's `AwqMarlinLinear` holding AutoAWQ "gemm" tensors (and a bias), repacked by the library for its
    kernel (`post_init`), on the tensors' device."""
    from gptqmodel.nn_modules.qlinear.marlin_awq import AwqMarlinLinear

    inner = AwqMarlinLinear(
        BITS, group, False, False, in_features, out_features,
        bias=bias is not None, register_buffers=True, dtype=torch.float16,
    )  # fmt: skip
    inner = inner.to(tensors["qweight"].device)
    for name, value in tensors.items():
        getattr(inner, name).data = value
    if bias is not None:
        inner.bias.data = bias.to(torch.float16)
    inner.post_init()
    return inner


def marlin_extension():
    """gptqmodel's float16 Marlin extension object (its build cache and loader)."""
    from gptqmodel.utils.marlin import _MARLIN_FP16_TORCH_OPS_EXTENSION

    return _MARLIN_FP16_TORCH_OPS_EXTENSION


def marlin_built() -> bool:
    """Whether Marlin is compiled for this GPU, torch and compiler in gptqmodel's cache (QUANT_KERNEL=auto takes it
    then; building it is `python -m scripts.build_marlin`, minutes). False where gptqmodel or CUDA is missing."""
    try:
        if not torch.cuda.is_available():
            return False
        return any(marlin_extension().build_root().glob("*.so"))
    except Exception:  # noqa: BLE001 - no gptqmodel, no compiler to fingerprint: not built
        return False


def build_marlin() -> None:
    """Compile (or load from the cache) Marlin's float16 kernels; raises with the library's reason."""
    from gptqmodel.utils.marlin import marlin_runtime_error, prewarm_marlin_extension

    if not prewarm_marlin_extension(torch.float16):
        raise RuntimeError(f"gptqmodel's Marlin kernels did not build: {marlin_runtime_error(torch.float16)}")
