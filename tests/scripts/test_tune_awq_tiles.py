"""scripts/tune_awq_tiles on the CPU (--fake: a cost model instead of GPU timings): the shapes it sweeps, and
the table it writes is the one infrastructure/quant_tiles reads."""

from __future__ import annotations

import json

from infrastructure.quant_tiles import plans_for
from scripts.tune_awq_tiles import grid, layer_shapes, main, table_from


def test_layer_shapes_of_the_70b():
    shapes = layer_shapes("llama-3.3-70b")
    assert shapes == {
        "q": (8192, 8192),
        "kv": (1024, 8192),
        "o": (8192, 8192),
        "gate_up": (28672, 8192),
        "down": (8192, 28672),
    }


def test_grid_tiles_fit_the_rows():
    assert {p["block_size_m"] for p in grid(1)} == {16}
    assert {p["block_size_m"] for p in grid(64)} == {32, 64}


def test_fake_sweep_writes_a_table_quant_tiles_reads(tmp_path):
    table_file = tmp_path / "table.json"
    table_file.write_text(json.dumps({"devices": {"other GPU": {"shapes": {}, "default": {}}}}))
    assert (
        main(["--fake", "--archs", "qwen2.5-7b", "--out", str(tmp_path / "r.json"), "--write-table", str(table_file)])
        == 0
    )
    report, table = json.loads((tmp_path / "r.json").read_text()), json.loads(table_file.read_text())
    assert set(table["devices"]) == {"other GPU", "fake"}  # merged, not overwritten
    entry = report["shapes"]["qwen2.5-7b"]["gate_up"]
    assert (entry["N"], entry["K"]) == (18944, 3584)
    assert entry["1"]["us"] <= entry["1"]["baseline_us"]  # the library's default is a candidate too
    assert plans_for(table, "fake", 18944, 3584) == {"1": entry["1"]["plan"], "64": entry["64"]["plan"]}


def test_default_plan_only_with_a_majority():
    a, b = {"path": "fused", "split_k_iters": 4}, {"path": "fused", "split_k_iters": 8}
    shapes = {
        f"s{i}": {"N": 64 * (i + 1), "K": 128, "1": {"plan": p}, "64": {"plan": a}} for i, p in enumerate((a, a, b))
    }
    table = {"devices": {"G": table_from({"command": "x", "shapes": {"arch": shapes}})}}
    assert plans_for(table, "G", 1, 1) == {"1": a, "64": a}  # shapes not swept: the plans most shapes chose
    shapes["s2"]["1"]["plan"] = {"path": "fused", "split_k_iters": 16}
    shapes["s3"] = {"N": 4096, "K": 128, "1": {"plan": b}, "64": {"plan": a}}
    table = {"devices": {"G": table_from({"command": "x", "shapes": {"arch": shapes}})}}
    assert plans_for(table, "G", 1, 1) is None  # no majority: the library's own policy
    assert plans_for(table, "G", 4096, 128) == {"1": b, "64": a}
