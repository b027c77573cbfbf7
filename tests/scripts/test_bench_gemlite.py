"""scripts/bench_gemlite on the CPU: torch's own int4 kernel (the --torch-int4 candidate) computes what the AWQ
parts stand for, after its zero-point conversion, and the per-GEMM report holds its column for every shape; the
Marlin column (CUDA only) is refused on the CPU with its reason."""

from __future__ import annotations

import json

import pytest
import torch

from infrastructure.quant_gemlite import QuantParts
from scripts.bench_gemlite import main, parse, torch_int4


def test_torch_int4_computes_the_awq_parts_product():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, group = 96, 256, 128
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_f, in_f // group), generator=g).half()
    scales = (torch.rand(out_f, in_f // group, generator=g) * 0.01 + 0.001).half()
    parts = QuantParts(codes, scales, zeros, None, group)
    x = torch.randn(3, in_f, generator=g)
    want = x @ parts.dequantise().t()
    got = torch_int4(parts, "cpu")(x).float()
    assert got.shape == want.shape
    assert (got - want).abs().max() / want.abs().max() < 0.01  # bfloat16 scales, zeros and activations
    wrong = QuantParts(codes, scales, zeros + 1, None, group)  # a zero off by one moves every output
    assert (torch_int4(wrong, "cpu")(x).float() - want).abs().max() / want.abs().max() > 0.05


def test_report_has_the_torch_int4_column(tmp_path):
    out = tmp_path / "gemm.json"
    assert main(["--arch", "tiny-llama", "--rows", "1", "--device", "cpu", "--reps", "2", "--torch-int4",
                 "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["shape"] for r in rows] == ["qkv", "o", "gate_up", "down"]
    for row in rows:
        assert row["torch_int4_us"] > 0 and row["torch_int4_rel_error"] < 0.01


def test_marlin_column_asks_for_a_gpu(capsys):
    with pytest.raises(SystemExit):
        parse(["--arch", "tiny-llama", "--device", "cpu", "--marlin", "--out", "x.json"])
    assert "--marlin needs a GPU" in capsys.readouterr().err
