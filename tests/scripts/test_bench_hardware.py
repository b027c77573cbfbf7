"""scripts/bench_hardware.py end to end on the CPU: build → save → the server's loader → engine → table.

The tiny 70B-shaped arch takes the longest path: a built checkpoint measured at 2 layers and, through the
symlinked half-depth folder, at 1 layer, then the 80-layer row extrapolated from both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the script end to end

ROOT = Path(__file__).resolve().parents[2]

# tiny llama (hidden 64, MLP 128, 4 query / 2 KV heads of 16, vocab 49408, untied): parameters per decoder layer
# (q, k, v, o, gate/up/down, two norms) and outside the layers (embeddings, lm_head, final norm)
PER_LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
FIXED = 2 * 49408 * 64 + 64


def test_tiny_run_fills_the_table_and_extrapolates_the_70b_shape(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    command = [sys.executable, "-m", "scripts.bench_hardware", "--tiny", "--device", "cpu", "--archs", "llama-3.3-70b"]
    command += ["--layers-70b", "2", "--quantizations", "none", "--new-tokens", "24", "--clients", "2"]
    command += ["--prompt-tokens", "8", "--out", str(out)]
    env = os.environ | {
        "MODEL_CACHE_DIR": str(ROOT / "data" / "models"),
        "TMPDIR": str(scratch),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| llama-3.3-70b (tiny)")]
    assert [r[0].strip("| ") for r in rows] == [
        "llama-3.3-70b (tiny), 2 of 80 layers",
        "llama-3.3-70b (tiny), 1 of 80 layers",
        "llama-3.3-70b (tiny), 80 layers (extrapolated)",
    ]
    for measured in rows[:2]:
        assert measured[1] == "none" and measured[3] == measured[4] == "n/a (CPU)"
        assert float(measured[5].replace(",", "")) > 0 and float(measured[6].replace(",", "")) > 0

    raw = json.loads((out / "bench_hardware.json").read_text())
    deep, shallow, line = raw["rows"]
    for run, layers in ((deep, 2), (shallow, 1)):
        assert run["quantization"] == "none" and run["layers"] == layers
        assert run["row"]["weights"] == 4 * (FIXED + layers * PER_LAYER)  # fp32 on the CPU
        assert run["one"]["tokens"] == 24 and run["many"]["tokens"] == 2 * 24
        assert run["one"]["complete"] and run["many"]["complete"]
    assert line["extrapolated"]["weights"] == 4 * (FIXED + 80 * PER_LAYER)
    assert (out / "bench_hardware.md").read_text().count("| llama-3.3-70b (tiny)") == 3
    assert not list(scratch.glob("bench_hw_*"))  # the saved checkpoints are gone
