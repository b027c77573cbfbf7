"""The RunPod worker entry point, run with the SDK's local test mode, answers what /runsync answers."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runpod_worker import sdk_runs_local_test, worker_concurrency

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
    assert len(frames) == 1 and json.loads(frames[0]["error"])["param"] == param  # JSON text, as the job's error


class FakeRunPod(BaseHTTPRequestHandler):
    """RunPod's job queue as a worker sees it: job-take(-batch), job-stop, job-done, job-stream."""

    batches: list[list[dict]] = []
    done: dict[str, dict] = {}
    streamed: dict[str, int] = {}
    taken: list[str] = []

    def _answer(self, status: int, body: object | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?")[0]
        ready = len(FakeRunPod.done) >= 3 * len(FakeRunPod.taken)  # the next batch once the last one is done
        if path.startswith("/job-take") and FakeRunPod.batches and ready:
            FakeRunPod.taken.append(self.path)
            jobs = FakeRunPod.batches.pop(0)
            return self._answer(200, jobs if "/job-take-batch/" in path else jobs[0])
        return self._answer(204)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        job_id = self.path.split("?")[0].rsplit("/", 1)[-1]
        if self.path.startswith("/job-done/"):
            FakeRunPod.done[job_id] = body
        else:
            FakeRunPod.streamed[job_id] = FakeRunPod.streamed.get(job_id, 0) + 1
        self._answer(200, {})

    def log_message(self, *args) -> None:
        return None


def test_worker_takes_jobs_concurrently_through_the_sdk_job_loop():
    """`python runpod_worker.py` as on RunPod (RUNPOD_WEBHOOK_GET_JOB set): the SDK takes a batch of jobs,
    runs them at once, streams frames and posts results; two two-row jobs share the engine's batch
    (the health job afterwards reports the engine's high-water mark: 4 rows), a bad job fails with
    JSON, and the health action answers."""
    long = REQUEST | {"n_completion_tokens": 24}
    bad = {"prompt": [{"role": "user", "content": "hi"}], "types": ["STEERED"]}
    FakeRunPod.batches = [
        [{"id": "job-a", "input": long}, {"id": "job-b", "input": long}, {"id": "job-c", "input": bad}],
        [{"id": "job-health", "input": {"action": "health"}}],
    ]
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRunPod)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")} | {
        "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=cpu",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
        "RUNPOD_POD_ID": "local-pod",
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_SKIP_GPU_CHECK": "true",
        "RUNPOD_CONCURRENCY": "4",
    }
    with tempfile.TemporaryFile("w+") as out:
        worker = subprocess.Popen([sys.executable, "runpod_worker.py"], cwd=ROOT, env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 600
            while len(FakeRunPod.done) < 4 and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            worker.terminate()  # the SDK stops its job loop on SIGTERM
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
            server.shutdown()
            out.seek(0)
            log = out.read()
    assert len(FakeRunPod.done) == 4, log[-3000:]
    assert "batch_size=4" in FakeRunPod.taken[0]  # RUNPOD_CONCURRENCY, within the engine's room (32 // 2)
    for job_id in ("job-a", "job-b"):
        frames = FakeRunPod.done[job_id]["output"]
        assert [o["type"] for o in frames[-1]["outputs"]] == ["STEERED", "DEFAULT"]
        assert FakeRunPod.streamed[job_id] == len(frames)  # every frame also streamed as it came
    a, b = (FakeRunPod.done[j]["output"][-1] for j in ("job-a", "job-b"))
    assert a["outputs"] == b["outputs"] and same(a["assistant_axis"], b["assistant_axis"])  # batched: float noise
    error = json.loads(FakeRunPod.done["job-c"]["error"])
    assert error == {"type": "invalid_request_error", "message": error["message"], "param": "vectors"}
    [health] = FakeRunPod.done["job-health"]["output"]
    assert health["status"] == "ok" and health["max_batch"] == 4, health


def test_concurrency_is_bounded_by_the_engine():
    assert worker_concurrency(32) == 16 and worker_concurrency(32, 4) == 4
    assert worker_concurrency(32, 100) == 16 and worker_concurrency(1) == 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_load_balancing_mode_serves_generate_on_port_and_ping_on_port_health():
    """`runpod_worker.py --load-balancing` with RunPod's PORT and PORT_HEALTH: /ping answers 204 while the model
    loads and 200 once it serves, on PORT_HEALTH; /generate (where Neuronpedia posts) streams on PORT."""
    import httpx

    port, health_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env |= {"HOST": "127.0.0.1", "PORT": str(port), "PORT_HEALTH": str(health_port), "LOG_FORMAT": "text"}
    seen: list[int] = []
    with tempfile.TemporaryFile("w+") as out:
        worker = subprocess.Popen([sys.executable, "runpod_worker.py", "--load-balancing"], cwd=ROOT, env=env,
                                  stdout=out, stderr=out)  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while (not seen or seen[-1] != 200) and worker.poll() is None and time.monotonic() < deadline:
                try:
                    seen.append(httpx.get(f"http://127.0.0.1:{health_port}/ping", timeout=5).status_code)
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            reply = httpx.post(f"http://127.0.0.1:{port}/generate", json=REQUEST | {"stream": True}, timeout=300)
            on_port = httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code
        finally:
            worker.terminate()
            worker.wait(60)
            out.seek(0)
            log = out.read()
    assert seen and seen[-1] == 200 and set(seen) <= {204, 200}, (seen, log[-2000:])
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream"), log[-2000:]
    frames = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: ")]
    assert [o["type"] for o in frames[-1]["outputs"]] == ["STEERED", "DEFAULT"] and on_port == 200
