"""Compile gptqmodel's Marlin 4-bit kernels for this GPU, torch and nvcc into the library's cache (issue 15).

    python -m scripts.build_marlin            # minutes (≈ 200 s on 16 cores, H200, CUDA 13.0)

After this, QUANT_KERNEL=auto serves AWQ / GPTQ checkpoints with Marlin (`infrastructure/quant_marlin.py`); the
cache is GPTQMODEL_TORCH_EXTENSIONS_DIR (default ~/.cache/gptqmodel/torch_extensions). Needs CUDA's compiler
(nvcc) and a GPU; TORCH_CUDA_ARCH_LIST narrows the targets (e.g. 9.0), MAX_JOBS the parallel compiles.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from infrastructure.prequantised import _keep_allocator_settings

    _keep_allocator_settings()
    from infrastructure.quant_marlin import build_marlin, marlin_extension

    started = time.perf_counter()
    try:
        build_marlin()
    except Exception as exc:  # noqa: BLE001 - reported as the command's answer
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Marlin ready in {time.perf_counter() - started:.0f} s: {marlin_extension().build_root()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
