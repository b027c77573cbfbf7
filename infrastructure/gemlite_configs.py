"""GemLite's kernel launch configs, settled before the engine warms up and captures its CUDA graphs (issue 15).

GemLite picks a kernel by row count (reverse split-K GEMV for 1-4 rows, split-K GEMM up to 63, GEMM from 64)
and a launch config per (rows bucket, N, K, group, packing, dtype) signature: from its config cache when the
signature is there, else by Triton autotuning (tens of candidates timed, seconds per shape) on first use. An
autotune inside a CUDA-graph capture would break it, and one in the middle of serving stalls every stream, so
at load, for the model's own shapes:

1. the config cache is filled from, in order (later ones win): GemLite's shipped file for the GPU family when
   GemLite did not load one itself (the H100's for any Hopper GPU, e.g. the H200), this project's measured file
   for the GPU (`infrastructure/gemlite_configs/<gpu>.json`), and the per-machine cache
   `MODEL_CACHE_DIR/gemlite/<gpu>.json` (`scripts/bench_gemlite --tune` writes it);
2. every signature the model can hit (its shapes x every rows bucket up to the largest step) that is still
   missing gets the config of the nearest measured signature: same kernel and rows bucket, nearest shape.

So serving never autotunes; `scripts/bench_gemlite` measures what a tuned config would gain.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("gemlite_configs")
KERNELS = ("GEMV_REVSPLITK", "GEMM_SPLITK", "GEMM")  # what GemLite runs 4-bit weights with (fp16 activations)
PACKED_PER_WORD = 8  # GemLite's elements_per_sample for 4-bit codes in int32 words
TYPE_ID = 104  # GemLite's type id of float16 (and bfloat16) activations x 4-bit weights
FAMILIES = {(9, 0): "h100"}  # compute capability -> GemLite's shipped file for GPUs it has none for
MAX_ROWS = 4096  # GemLite buckets every larger row count with this one


def slug(device_name: str) -> str:
    """A file name for a GPU: 'NVIDIA H200' -> 'nvidia_h200'."""
    return "".join(c if c.isalnum() else "_" for c in device_name.lower()).strip("_")


def signature(rows: int, n: int, k: int, group: int) -> str:
    """GemLite's cache key (rows already bucketed)."""
    return str((rows, n, k, group, PACKED_PER_WORD, TYPE_ID))


def _parse(key: str) -> tuple[int, ...] | None:
    try:
        values = tuple(int(v) for v in key.strip("()").split(","))
    except ValueError:
        return None
    return values if len(values) == 6 else None


def needed(max_rows: int, bucket, kernel_for) -> dict[str, list[int]]:
    """The rows buckets each kernel is called with for 1..max_rows rows (`bucket`, `kernel_for`: GemLite's)."""
    out: dict[str, set[int]] = {}
    for rows in range(1, max_rows + 1):
        out.setdefault(kernel_for(rows), set()).add(bucket(rows))
    return {name: sorted(values) for name, values in out.items()}


def _distance(a: tuple[int, ...], rows: int, n: int, k: int) -> tuple[float, float]:
    return abs(math.log2(a[0] / rows)), abs(math.log(a[2] / k)) + abs(math.log(a[1] / n))


def fill_missing(cache: dict, shapes: set[tuple[int, int, int]], buckets: dict[str, list[int]]) -> int:
    """Give every (kernel, rows bucket, shape) the nearest known config where it has none; the number added.
    Donors: the same kernel, group, packing and type, nearest rows bucket first, then nearest N and K."""
    added = 0
    for kernel, rows_list in buckets.items():
        known = cache.setdefault(kernel, {})
        donors = [(t, cfg) for key, cfg in known.items() if (t := _parse(key))]
        for n, k, group in sorted(shapes):
            same = [(t, cfg) for t, cfg in donors if t[3:] == (group, PACKED_PER_WORD, TYPE_ID)]
            pool = same or [(t, cfg) for t, cfg in donors if t[4:] == (PACKED_PER_WORD, TYPE_ID)]
            for rows in rows_list:
                key = signature(rows, n, k, group)
                if key in known or not pool:
                    continue
                _, cfg = min(pool, key=lambda item: _distance(item[0], rows, n, k))
                known[key] = dict(cfg)
                added += 1
    return added


def model_shapes(model: torch.nn.Module) -> set[tuple[int, int, int]]:
    """(N out, K in, group) of the model's GemLite modules."""
    return {
        (int(m.out_features), int(m.in_features), int(m.group_size))
        for m in model.modules()
        if type(m).__name__.startswith("GemLiteLinear")
    }


def settle(model: torch.nn.Module, cache_dir: Path | None, max_rows: int = MAX_ROWS) -> dict:
    """Load the config files for this GPU and fill the model's missing signatures (see the module docstring).
    Returns what was loaded and how many signatures were filled (also logged)."""
    return settle_shapes(model_shapes(model), cache_dir, max_rows)


def settle_shapes(shapes: set[tuple[int, int, int]], cache_dir: Path | None, max_rows: int = MAX_ROWS) -> dict:
    """`settle` for explicit (N, K, group) shapes."""
    import gemlite
    from gemlite import core
    from gemlite.triton_kernels.utils import get_closest_m

    name = torch.cuda.get_device_name(0)
    files: list[Path] = []
    family = FAMILIES.get(torch.cuda.get_device_capability(0))
    if core.get_default_cache_config() is None and family:
        files.append(Path(core.__file__).with_name("configs") / f"{family}.json")
    files.append(CONFIG_DIR / f"{slug(name)}.json")
    if cache_dir is not None:
        files.append(Path(cache_dir) / "gemlite" / f"{slug(name)}.json")
    loaded = [str(f) for f in files if f.is_file() and gemlite.load_config(str(f), print_error=False)]
    buckets = needed(max_rows, get_closest_m, lambda rows: core.get_matmul_type(rows, 4, False))
    filled = fill_missing(core.GEMLITE_TRITON_CONFIG_CACHE, shapes, buckets)
    log.info("GemLite configs for %s: loaded %s; %d signatures of %d shapes filled from the nearest measured ones",
             name, loaded or "none", filled, len(shapes))  # fmt: skip
    return {"device": name, "loaded": loaded, "filled": filled, "shapes": len(shapes)}
