"""The measured AWQ tile plans (infrastructure/quant_tiles): table lookup, the M boundary, and registration
through gptqmodel's own extension point, checked by asking the library's scheduler what it would launch."""

from __future__ import annotations

import pytest
import torch

from infrastructure.quant_tiles import (
    MAX_M,
    SMALL_M,
    load_table,
    plan_for_rows,
    plans_for,
    register_awq_tiles,
    shape_key,
)

ONE = {"path": "fused", "block_size_m": 16, "block_size_n": 128, "block_size_k": 64, "split_k_iters": 16}
ONE |= {"num_warps": 4, "num_stages": 3}
MANY = {"path": "fused", "block_size_m": 64, "block_size_n": 64, "block_size_k": 64, "split_k_iters": 4}
MANY |= {"num_warps": 4, "num_stages": 2}
DEFAULT = {"1": ONE | {"split_k_iters": 8}, "64": MANY}
TABLE = {"devices": {"GPU X": {"shapes": {shape_key(512, 2048): {"1": ONE, "64": MANY}}, "default": DEFAULT}}}


class AwqGEMMTritonLinear(torch.nn.Module):
    """Stands in for gptqmodel's module: registration reads only its class name and shape attributes."""

    def __init__(self, n: int, k: int):
        super().__init__()
        self.out_features, self.in_features, self.group_size, self.fp32_accum = n, k, 128, True


def test_lookup_measured_shape_then_device_default():
    assert plans_for(TABLE, "GPU X", 512, 2048) == {"1": ONE, "64": MANY}
    assert plans_for(TABLE, "GPU X", 1024, 2048) == DEFAULT  # a shape not swept: the device's default
    assert plans_for(TABLE, "GPU Y", 512, 2048) is None  # another GPU: the library's own policy
    assert plans_for({}, "GPU X", 512, 2048) is None


def test_rows_boundary():
    plans = {"1": ONE, "64": MANY}
    assert plan_for_rows(plans, 1) == plan_for_rows(plans, SMALL_M) == ONE
    assert plan_for_rows(plans, SMALL_M + 1) == plan_for_rows(plans, MAX_M) == MANY


def test_cpu_or_unquantised_registers_nothing():
    model = torch.nn.Sequential(AwqGEMMTritonLinear(512, 2048))
    assert register_awq_tiles(model, torch.device("cpu"), TABLE, "GPU X") == 0
    assert register_awq_tiles(torch.nn.Linear(4, 4), torch.device("cuda", 0), TABLE, "GPU X") == 0


def test_registered_rules_are_what_the_library_launches():
    scheduler = pytest.importorskip("gptqmodel.quantization.awq.modules.triton.scheduler")
    model = torch.nn.Sequential(AwqGEMMTritonLinear(512, 2048), AwqGEMMTritonLinear(512, 2048))
    device = torch.device("cuda", 0)  # only the key: the library's device identity needs no GPU
    scheduler.clear_awq_triton_rules()
    try:
        assert register_awq_tiles(model, device, TABLE, "GPU X") == MAX_M  # one shape, M = 1..128
        for rows, expected in ((1, ONE), (SMALL_M, ONE), (SMALL_M + 1, MANY), (64, MANY)):
            plan = scheduler.select_awq_triton_plan(
                M=rows, N=512, K=2048, group_size=128, device=device, input_dtype=torch.float16,
                compute_dtype=torch.float16, output_dtype=torch.float16, fp32_accum=True,
            )  # fmt: skip
            assert plan == scheduler.AwqTritonPlan(**expected)
        legacy = scheduler.select_awq_triton_plan(
            M=MAX_M + 1, N=512, K=2048, group_size=128, device=device, input_dtype=torch.float16,
            compute_dtype=torch.float16, output_dtype=torch.float16, fp32_accum=True,
        )  # fmt: skip
        assert legacy.path == "dense"  # prefill sizes keep the library's policy
    finally:
        scheduler.clear_awq_triton_rules()


def test_shipped_table_holds_only_plans_the_library_accepts():
    scheduler = pytest.importorskip("gptqmodel.quantization.awq.modules.triton.scheduler")
    for device in load_table().get("devices", {}).values():
        for key, plans in [*device["shapes"].items(), ("default", device.get("default", {}))]:
            n, k = (int(v) for v in key.split("x")) if key != "default" else (8192, 8192)
            for rows, plan in plans.items():
                fields = {f: v for f, v in plan.items() if f != "path"}
                assert scheduler.valid_fused_config(M=int(rows), N=n, K=k, group_size=128, **fields), (key, plan)
