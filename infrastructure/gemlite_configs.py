"""GemLite's kernel launch configs, settled before the engine warms up and captures its CUDA graphs (issue 15).

GemLite picks a kernel by row count (reverse split-K GEMV for 1-4 rows, split-K GEMM up to 63, GEMM from 64;
we move 64 rows to split-K, `kernel_for`: on an H200 it is 1.0-2.8x faster there on the 70B's shapes) and a
launch config per (rows bucket, N, K, group, packing, dtype) signature: from its config cache when the
signature is there, else by Triton autotuning (tens of candidates timed, seconds per shape) on first use. An
autotune inside a CUDA-graph capture would break it, and one in the middle of serving stalls every stream, so
at load, for the model's own shapes:

1. the config cache is filled from, in order (later ones win): GemLite's shipped file for the GPU family when
   GemLite did not load one itself (the H100's for any Hopper GPU, e.g. the H200), this project's measured file
   for the GPU (`infrastructure/gemlite_configs/<gpu>.json`), and the per-machine cache
   `MODEL_CACHE_DIR/gemlite/<gpu>.json` (`scripts/bench_gemlite --tune` writes it);
2. every signature the model can hit (its shapes x every rows bucket up to the largest step) that is still
   missing gets the config of the nearest measured signature: same kernel and rows bucket, nearest shape;
3. every config of the model's shapes is made to tile K exactly (`fit_k`): GemLite's split-K kernels read a
   group's scales and zeros unmasked, so a split that starts past K reads past the tensors (seen on an H200:
   NaN outputs at K = 256 with a config borrowed from a larger shape).

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
SPLITK_UP_TO = 64  # rows up to this run split-K GEMM (GemLite's own switch to GEMM is at 64)


def kernel_for(rows: int) -> str:
    """The GemLite kernel our linears run `rows` rows with (GemLite's choice, except 64 rows: split-K)."""
    if rows <= 4:
        return "GEMV_REVSPLITK"
    return "GEMM_SPLITK" if rows <= SPLITK_UP_TO else "GEMM"


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


def fit_k(cache: dict, shapes: set[tuple[int, int, int]]) -> int:
    """Shrink SPLIT_K, then BLOCK_SIZE_K, of the configs of these shapes until their K tiles cover K exactly
    (reverse split-K GEMV splits in two); the number changed."""
    changed = 0
    for kernel, configs in cache.items():
        splits = 2 if kernel == "GEMV_REVSPLITK" else None
        for key, cfg in configs.items():
            t = _parse(key)
            if not t or (t[1], t[2], t[3]) not in shapes or t[4:] != (PACKED_PER_WORD, TYPE_ID):
                continue
            if "BLOCK_SIZE_K" not in cfg:
                continue
            k, before = t[2], (cfg.get("SPLIT_K"), cfg["BLOCK_SIZE_K"])
            split = splits or int(cfg.get("SPLIT_K", 1))
            while split > 1 and splits is None and k % (cfg["BLOCK_SIZE_K"] * split):
                split //= 2
            least = 8 if splits else 32  # GemLite's own floors: a GEMV tile, tl.dot's K
            while cfg["BLOCK_SIZE_K"] > least and k % (cfg["BLOCK_SIZE_K"] * split):
                cfg["BLOCK_SIZE_K"] //= 2
            if "SPLIT_K" in cfg:
                cfg["SPLIT_K"] = split
            changed += before != (cfg.get("SPLIT_K"), cfg["BLOCK_SIZE_K"])
    return changed


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
    buckets = needed(max_rows, get_closest_m, kernel_for)
    filled = fill_missing(core.GEMLITE_TRITON_CONFIG_CACHE, shapes, buckets)
    fitted = fit_k(core.GEMLITE_TRITON_CONFIG_CACHE, shapes)
    log.info("GemLite configs for %s: loaded %s; %d signatures of %d shapes filled from the nearest measured ones, "
             "%d fitted to K", name, loaded or "none", filled, len(shapes), fitted)  # fmt: skip
    return {"device": name, "loaded": loaded, "filled": filled, "fitted": fitted, "shapes": len(shapes)}
