"""scripts/load_test.py at CI size: its own server on loopback, streams, disconnects, bad requests;
afterwards idle, no hook, memory near its baseline, and the same greedy probe text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the script end to end against a real server

ROOT = Path(__file__).resolve().parents[2]


def test_small_load_run_passes_every_check():
    args = ["--clients", "4", "--requests", "12", "--max-tokens", "4", "--disconnect-share", "0.25"]
    args += ["--bad-share", "0.2", "--time-limit", "400", "--seed", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "scripts.load_test", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    report = json.loads(done.stdout)
    print(json.dumps(report, indent=2))
    outcomes = report["outcomes"]
    assert report["checks"] == dict.fromkeys(report["checks"], True), report["checks"]
    assert done.returncode == 0
    assert sum(outcomes.values()) == 12 and outcomes["failed"] == 0
    assert outcomes["completed"] >= 1 and outcomes["cancelled"] >= 1 and outcomes["bad_request"] >= 1
    assert report["hooks_attached"] == 0 and report["probe"]["before"] == report["probe"]["after"]
    assert report["engine"]["max_batch"] >= 2  # concurrent clients really shared batches
