"""Pre-quantised AWQ and GPTQ checkpoints: which kernel runs them, in which dtype, and what loading them needs.

transformers loads both through its own quantizers (AwqQuantizer, GptqHfQuantizer), which swap every
Linear for a 4-bit module of the `gptqmodel` library before the packed weights are read; GPTQ also goes
through `optimum`. The library picks a kernel per device unless told; we tell it (QUANT_KERNEL=auto):

* CUDA: its Triton kernels (AWQ `gemm_triton`, GPTQ `triton`): fused 4-bit dequantise + matmul, compiled by
  Triton at run time, so they need no CUDA extension built for this torch, and they run inside the paged
  engine's CUDA graphs. The library's own pick would try its compiled Marlin/Machete/ExLlama kernels first,
  which exist only when built against the installed torch (and with a compiler present, it builds them on
  first use, for minutes).
* CPU: the library's choice, the `aten` int4 kernels torch ships (`_weight_int4pack_mm_for_cpu`).

On CUDA with GemLite importable, `auto` goes further: the checkpoint loads onto gptqmodel's Triton (AWQ "gemv":
GEMV) modules, which never run, and `infrastructure/quant_gemlite.py` repacks every one for GemLite's
kernels (several times faster at one decode row); act-order GPTQ and non-4-bit checkpoints stay on Triton.
`QUANT_KERNEL=gemlite` asks for it explicitly (on the CPU: the same repacking, dequantised; for tests).
`QUANT_KERNEL=marlin` repacks the same parts for gptqmodel's Marlin CUDA kernels (`infrastructure/quant_marlin.py`,
faster than GemLite at every row count measured), compiled by the library with nvcc on first use (minutes; then
cached); `auto` takes Marlin once that build is in the cache (`python -m scripts.build_marlin`).

Both kernels compute in float16 on a GPU: the model's dtype is float16 there (AWQ's quantizer casts
bfloat16 to float16 anyway), so the steering tables, which follow the model's dtype, are float16 too.
The residual stream stays a plain float16 tensor between layers: steering, capping and capture act on it
unchanged. On the CPU MODEL_DTYPE=auto stays float32 (the kernels cast internally).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

PREQUANTISED = ("awq", "gptq")
# QUANT_KERNEL values: the gptqmodel backend per (method, kernel); "auto" picks per device (see above)
KERNELS = {
    ("awq", "triton"): "gemm_triton",
    ("awq", "torch"): "torch_awq",
    ("gptq", "triton"): "triton",
    ("gptq", "torch"): "torch",
}


def _keep_allocator_settings() -> None:
    """Importing gptqmodel sets PYTORCH_ALLOC_CONF (expandable segments, split limits) when it is unset, which
    would change the CUDA caching allocator under the whole server; pin torch's default first."""
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")


def prequantised_dtype(method: str, device: str, dtype: torch.dtype) -> torch.dtype:
    """The model dtype a pre-quantised checkpoint runs in: float16 on a GPU (the 4-bit kernels' dtype)."""
    if device == "cuda" and method in PREQUANTISED and dtype != torch.float16:
        log.warning("%s kernels compute in float16 on a GPU: loading in float16 instead of %s", method, dtype)
        return torch.float16
    return dtype


def resolve_kernel(method: str, config_q: Any, device: str, kernel: str) -> str:
    """QUANT_KERNEL=auto on CUDA, for a checkpoint the repacking takes: marlin where gptqmodel's Marlin kernels are
    already compiled in its cache, else gemlite where GemLite imports, else triton; the library's pick on the CPU.
    Explicit values are kept."""
    if kernel != "auto":
        return kernel
    if device != "cuda":
        return "library"
    from infrastructure.quant_gemlite import UnsupportedLayout, gemlite_available, layout_of
    from infrastructure.quant_marlin import marlin_built

    values = dict(config_q) if isinstance(config_q, dict) else config_q.to_dict()
    try:
        layout_of(method, values)
    except UnsupportedLayout:
        return "triton"
    if method == "gptq" and values.get("desc_act"):
        return "triton"
    _keep_allocator_settings()
    if marlin_built():
        return "marlin"
    log.info("QUANT_KERNEL=auto: GemLite; Marlin is faster once built (python -m scripts.build_marlin, minutes)")
    return "gemlite" if gemlite_available() else "triton"


def _loading_backend(method: str, config_q: Any, device: str) -> str:
    """The gptqmodel backend a checkpoint loads onto before GemLite repacks it (its layout's own module)."""
    from infrastructure.quant_gemlite import layout_of

    if layout_of(method, config_q) == "awq-gemv":
        return "gemv"
    return KERNELS[(method, "triton" if device == "cuda" else "torch")]


def prequantised_kwargs(method: str, config_q: Any, device: str, kernel: str = "auto") -> dict[str, Any]:
    """from_pretrained kwargs for an AWQ / GPTQ checkpoint: its own quantization config with the kernel chosen."""
    from transformers import AwqConfig, GPTQConfig

    _keep_allocator_settings()
    values = dict(config_q) if isinstance(config_q, dict) else config_q.to_dict()
    kernel = resolve_kernel(method, values, device, kernel)
    if kernel in ("gemlite", "marlin"):  # loaded onto the layout's own modules, then repacked
        values["backend"] = _loading_backend(method, values, device)
    elif kernel != "library":
        if (method, kernel) not in KERNELS:
            raise ValueError(f"QUANT_KERNEL={kernel} is not available for {method} checkpoints")
        values["backend"] = KERNELS[(method, kernel)]
    values.pop("quant_method", None)
    cls = AwqConfig if method == "awq" else GPTQConfig
    return {"quantization_config": cls.from_dict(values)}
