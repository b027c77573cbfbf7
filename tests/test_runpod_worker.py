"""The RunPod worker entry point, run with the SDK's local test mode, answers what /runsync answers."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runpod_worker import sdk_runs_local_test

ROOT = Path(__file__).resolve().parents[1]
REQUEST = {
    "prompt": [
        {"role": "user", "content": "Hi!"},
    ],
    "types": ["STEERED", "DEFAULT"],
    "vectors": [{"hook": "blocks.15.hook_resid_post", "strength": 40.0, "steering_vector": [0.05] * 576}],
    "temperature": 0,
    "n_completion_tokens": 6,
}


def same(a: object, b: object) -> bool:
    """Structural equality with float tolerance (two processes, same CPU kernels)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, abs_tol=1e-4)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def run_worker_locally(job: dict) -> dict:
    """The final frame of `python runpod_worker.py --test_input ...`.

    The SDK logs `Job result: {'output': [frames...]}` as a Python repr, and runpod 1.12's logger
    keeps only the first and last 2048 characters of a longer message; the final frame (kept small
    here) is whole in the tail: from its last `{'outputs': ` to the list's closing bracket."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_REALTIME_PORT")}
    proc = subprocess.run(
        [sys.executable, "runpod_worker.py", "--test_input", json.dumps(job)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Job result: {'output': [{'outputs': " in proc.stdout
    tail = proc.stdout.split("Job result: ", 1)[1].split("\nINFO   | Local testing complete", 1)[0]
    return ast.literal_eval(tail[tail.rindex("{'outputs': ") : tail.rindex("]}")])


async def test_worker_local_test_returns_the_same_final_frame_as_runsync(client):
    r = await client.post("/runsync", json={"input": REQUEST})
    assert r.status_code == 200
    expected = r.json()["output"]
    last = run_worker_locally({"input": REQUEST})
    assert same(last, expected[-1])
    assert [o["type"] for o in last["outputs"]] == ["STEERED", "DEFAULT"]
    assert "assistant_axis" in last and last["outputs"][0]["raw"] != last["outputs"][1]["raw"]


def test_local_test_mode_is_detected(monkeypatch):
    monkeypatch.delenv("RUNPOD_WEBHOOK_GET_JOB", raising=False)
    monkeypatch.delenv("RUNPOD_REALTIME_PORT", raising=False)
    monkeypatch.setattr(sys, "argv", ["runpod_worker.py", "--test_input", "{}"])
    assert sdk_runs_local_test()
    monkeypatch.setenv("RUNPOD_WEBHOOK_GET_JOB", "https://api.runpod.ai/v2/x/job-take/$ID")
    monkeypatch.setattr(sys, "argv", ["runpod_worker.py"])
    assert not sdk_runs_local_test()


@pytest.mark.parametrize(
    ("job_input", "param"),
    [
        ({"prompt": [{"role": "user", "content": "hi"}], "types": ["STEERED"]}, "vectors"),
        ({"prompt": [{"role": "user", "content": "hi"}], "typo": 1}, "typo"),
    ],
)
async def test_worker_handler_yields_one_error_frame_for_a_bad_input(runtime, job_input, param, monkeypatch):
    import runpod_worker

    monkeypatch.setattr(runpod_worker, "RUNTIME", runtime)
    frames = [f async for f in runpod_worker.handler({"id": "t", "input": job_input})]
    assert len(frames) == 1 and frames[0]["error"]["param"] == param
