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

from infrastructure import marlin_layout
from infrastructure.marlin_layout import MarlinLayout
from infrastructure.quant_gemlite import AWQ_ORDER, BITS, PACK, QuantParts

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
    the constructor, then `pack(codes, scales, zeros, bias)`. float16 activations.

    Products of DENSE_FROM_ROWS rows or more (prefill chunks) dequantise the weight to float16 through
    `marlin_layout` (one Triton kernel on the GPU) and run on cuBLAS: Marlin's tensor-core loop reaches about a
    third of an H200's float16 rate at thousands of rows, and dequantising costs one pass over the weight. The
    layout is checked once per process against the library's repacking and once per weight shape against the
    codes packed; where either check fails (logged) every product stays on Marlin."""

    def __init__(self, W_nbits, group_size, in_features, out_features, input_dtype=None, output_dtype=None):  # noqa: N803
        super().__init__()
        if W_nbits != BITS:
            raise ValueError(f"{W_nbits}-bit weights: Marlin runs 4-bit weights here")
        self.group_size, self.in_features, self.out_features = group_size, in_features, out_features
        self.inner: nn.Module | None = None
        self.layout: MarlinLayout | None = None  # set when prefill-sized products may run dense
        self.bias: torch.Tensor | None = None  # float16, in the outputs' order (Marlin's own copy is permuted)

    def pack(self, W_q, scales, zeros, bias=None, fma_mode=False):  # noqa: N803 - GemLite's signature
        tensors = pack_awq_gemm(W_q, zeros, scales)
        self.inner = awq_marlin_module(tensors, self.in_features, self.out_features, self.group_size, bias)
        self.bias = None if bias is None else bias.to(torch.float16)
        self.layout = dense_layout(self, W_q, scales, zeros)
        return self

    def dequantised(self) -> torch.Tensor:
        """The float16 [in, out] weight (Triton on the GPU, the torch reference elsewhere)."""
        i = self.inner
        if i.qweight.is_cuda:
            from infrastructure.marlin_triton import dequantise
        else:
            dequantise = marlin_layout.dequantise
        return dequantise(self.layout, i.qweight, i.scales, i.qzeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout is None or x.numel() < DENSE_FROM_ROWS * self.in_features:
            return self.inner(x)
        out = torch.matmul(x, self.dequantised())
        return out if self.bias is None else out + self.bias


DENSE_FROM_ROWS = 1024  # products of this many rows or more run dequantised on cuBLAS (scripts/bench_gemlite.py)
_LAYOUTS: dict[str, MarlinLayout | None] = {}  # per device: the probed layout (None: not dequantisable)
_CHECKED: dict[tuple, bool] = {}  # per (device, in, out, group): the dequantiser reproduced the packed weight


def library_repack(codes, zeros, scales, group: int):
    """gptqmodel's Marlin tensors (qweight, scales, qzeros) of parts: what `marlin_layout.probe` reads."""
    inner = awq_marlin_module(pack_awq_gemm(codes, zeros, scales), codes.shape[1], codes.shape[0], group)
    return inner.qweight, inner.scales, inner.qzeros


def dense_layout(linear: MarlinLinear, codes, scales, zeros, repack=library_repack) -> MarlinLayout | None:
    """The layout through which `linear` dequantises its weight, or None where it cannot: a weight Marlin pads
    (`in` not a multiple of 128 or `out` of 64 in the library's terms), one group per row, a layout that is not
    the probed one. The first module of each shape is dequantised and compared with the parts packed."""
    inner = linear.inner
    if linear.group_size >= linear.in_features or getattr(inner, "_marlin_tile_padding", None) is not None:
        return None
    if linear.in_features % 32 or linear.out_features % 128 or linear.group_size % 32:
        return None  # the Triton dequantiser's blocks (marlin_triton.BLOCK_K x BLOCK_N, one group per block)
    device = str(codes.device)
    if device not in _LAYOUTS:
        _LAYOUTS[device] = marlin_layout.probe(repack, codes.device)
    layout = _LAYOUTS[device] and _LAYOUTS[device].to(codes.device)
    if layout is None:
        return None
    key = (device, linear.in_features, linear.out_features, linear.group_size)
    if key not in _CHECKED:
        linear.layout = layout
        _CHECKED[key] = _reproduces(linear, codes, scales, zeros)
        if not _CHECKED[key]:
            shape = (linear.in_features, linear.out_features, linear.group_size)
            log.warning("Marlin weights of %d x %d (group %d) do not dequantise to the codes packed: their "
                        "prefill products stay on Marlin", *shape)  # fmt: skip
    return layout if _CHECKED[key] else None


def _reproduces(linear: MarlinLinear, codes, scales, zeros, rows: int = 4096) -> bool:
    """Whether the dequantised weight equals the parts' (codes - zeros) * scales, compared `rows` outputs at a
    time (the float32 reference of a 70B gate/up projection is 1.9 GB)."""
    weight = linear.dequantised()
    for start in range(0, codes.shape[0], rows):
        part = slice(start, start + rows)
        want = QuantParts(codes[part], scales[part], zeros[part], None, linear.group_size).dequantise(torch.float16)
        if not torch.equal(weight[:, part].t(), want):
            return False
    return True


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
