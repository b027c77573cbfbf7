"""Measured Triton tile plans for gptqmodel's AWQ GEMM on GPUs its own table does not cover (issue 15).

gptqmodel's AWQ Triton scheduler (`gptqmodel.quantization.awq.modules.triton.scheduler`) picks a launch plan
per exact (M, N, K, group) and device: block sizes M/N/K, split-K, warps, stages. It ships measured plans only
for an RTX 4090; everywhere else every decode GEMM runs its generic 32x32x32 tile with split-K 8, which on an
H200 reads the 4-bit weights at about a tenth of the memory bandwidth. The library's extension point for this
is `register_awq_triton_rule`: exact-shape rules an application installs. This module installs ours:

* `quant_tiles.json` (beside this file) holds, per GPU name, the plan measured best for each layer shape
  (N out, K in) at one decode row (M=1) and at 64 rows, chosen by `scripts/tune_awq_tiles.py` (a sweep of
  candidate plans timed as CUDA graphs on the real shapes), plus a per-device default for shapes not swept;
* `register_awq_tiles(model)` runs after an AWQ checkpoint is loaded on a GPU and registers, for every
  distinct layer shape and every decode batch M = 1..128 (the scheduler keys rules by exact M), the 1-row plan
  for M <= 16 and the 64-row plan above. Larger M (prefill) keeps the library's policy (dequantise + cuBLAS).

The kernel itself is the library's, unchanged. Rules are registered before the paged engine warms and
captures its CUDA graphs (registration clears the library's warm-up cache, so it must not happen later).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("quant_tiles.json")
SMALL_M = 16  # decode batches up to this many rows use the plan measured at M=1 (one 16-row tile)
MAX_M = 128  # above this the library dequantises and calls cuBLAS (its own boundary)
PLAN_FIELDS = ("path", "block_size_m", "block_size_n", "block_size_k", "split_k_iters", "num_warps", "num_stages")


def shape_key(n: int, k: int) -> str:
    """The table's key of a layer shape: out features x in features."""
    return f"{n}x{k}"


def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    """The measured plans by device name ({} when the file is absent)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def plans_for(table: dict[str, Any], device_name: str, n: int, k: int) -> dict[str, dict] | None:
    """{"1": plan, "64": plan} for a shape on a device: its measured plans, else the device's default."""
    device = (table.get("devices") or {}).get(device_name)
    if not device:
        return None
    return (device.get("shapes") or {}).get(shape_key(n, k)) or device.get("default")


def plan_for_rows(plans: dict[str, dict], rows: int) -> dict:
    """The plan a decode batch of `rows` uses: the 1-row plan up to SMALL_M rows, the 64-row one above."""
    return plans["1"] if rows <= SMALL_M else plans["64"]


def _plan(fields: dict):
    from gptqmodel.quantization.awq.modules.triton.scheduler import AwqTritonPlan

    return AwqTritonPlan(**{name: fields[name] for name in PLAN_FIELDS if name in fields})


def awq_shapes(model: torch.nn.Module) -> dict[tuple[int, int, int], Any]:
    """Distinct (N, K, group) of the model's AWQ Triton modules, each with one module (for its settings)."""
    shapes: dict[tuple[int, int, int], Any] = {}
    for module in model.modules():
        if type(module).__name__ == "AwqGEMMTritonLinear":
            shapes.setdefault((module.out_features, module.in_features, module.group_size), module)
    return shapes


def register_awq_tiles(
    model: torch.nn.Module, device: torch.device, table: dict | None = None, device_name: str | None = None
) -> int:
    """Install the measured plans of this GPU for every AWQ layer shape of `model`; the number of rules.
    `device_name` (default: the GPU's own) picks the table's entry."""
    if device.type != "cuda":
        return 0
    shapes = awq_shapes(model)
    if not shapes:
        return 0
    from gptqmodel.quantization.awq.modules.triton.scheduler import register_awq_triton_rule

    table = load_table() if table is None else table
    name = device_name or torch.cuda.get_device_name(device)
    count, missing = 0, []
    for (n, k, group), module in shapes.items():
        plans = plans_for(table, name, n, k)
        if plans is None:
            missing.append(shape_key(n, k))
            continue
        fp32_accum = bool(getattr(module, "fp32_accum", True))
        for rows in range(1, MAX_M + 1):
            plan = _plan(plan_for_rows(plans, rows))
            kwargs = dict(M=rows, N=n, K=k, group_size=group, fp32_accum=fp32_accum)
            try:
                register_awq_triton_rule(
                    device, plan, input_dtype=torch.float16, output_dtype=torch.float16, compute_dtype=torch.float16,
                    **kwargs,
                )  # fmt: skip
            except ValueError as exc:  # a plan the library rejects for this shape: its own policy stays
                log.warning("AWQ tile plan %s rejected for %s: %s", plan, kwargs, exc)
                continue
            count += 1
    if missing:
        log.info("no measured AWQ tile plans for %s on %s: gptqmodel's default plan", missing, name)
    log.info("registered %d AWQ Triton tile rules for %d layer shapes on %s", count, len(shapes), name)
    return count
