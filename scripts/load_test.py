"""Load test on loopback: many concurrent streaming clients, some disconnecting mid-stream, bad
requests mixed in; then checks the server returned to its baseline (memory, no hook, same greedy text).

    python -m scripts.load_test --clients 32 --requests 200 --max-tokens 16

Starts its own server (uvicorn in a subprocess on 127.0.0.1, a free port, the configured or embedded
model), prints a JSON report, and exits 1 when a check fails."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/steer/completion-chat"
PROMPTS = ["Tell me about the sea.", "What is a good breakfast?", "Describe a cat.", "Why is the sky blue?"]
PROBE = {"prompt": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "n_completion_tokens": 12}
BAD_BODIES = [
    {"prompt": []},
    {"prompt": [{"role": "user", "content": "hi"}], "temperature": -1},
    {"prompt": [{"role": "user", "content": "hi"}], "types": ["STEERED"]},
    {"prompt": [{"role": "user", "content": "hi"}], "strenght": 3},
    {"prompt": "not a chat"},
    {
        "prompt": [{"role": "user", "content": "hi"}],
        "types": ["STEERED"],
        "vectors": [{"hook": "blocks.0.hook_resid_post", "strength": 1, "steering_vector": [1.0, 2.0]}],
    },  # noqa: E501
    # issue 20's classes: each once failed neighbours or answered 500
    {"prompt": [{"role": "user", "content": "hi"}], "temperature": 1e-40},
    '{"prompt": [{"role": "user", "content": "\\ud800"}]}',  # raw JSON text: a lone surrogate escape
    {
        "prompt": [{"role": "user", "content": "hi"}],
        "types": ["STEERED", "DEFAULT"],
        "strength_multiplier": 1e6,
        "vectors": [{"hook": "blocks.3.hook_resid_post", "strength": 1e6, "steering_vector": [1e30] * 576}],
    },
    {
        "prompt": [{"role": "user", "content": "hi"}],
        "types": ["STEERED"],
        "vectors": [{"hook": "blocks.03.hook_resid_post", "strength": 1, "steering_vector": [0.0] * 576}],
    },
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--requests", type=int, default=200, help="requests in all")
    p.add_argument("--max-tokens", type=int, default=16, help="n_completion_tokens per request")
    p.add_argument("--disconnect-share", type=float, default=0.2, help="share of clients that vanish mid-stream")
    p.add_argument("--bad-share", type=float, default=0.1, help="share of malformed requests")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole load phase")
    p.add_argument("--memory-slack-mb", type=float, default=256.0, help="allowed RSS growth over the baseline")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------- the server under test ----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET", "API_KEY", "RATE_LIMIT", "FAULT_INJECTION")}
    env |= {"LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "main:build_app", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd + ["--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


async def wait_healthy(client: httpx.AsyncClient, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("the server did not become healthy in time")


def rss_bytes(pid: int) -> int:
    """Resident memory of the server process (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the server's memory")


# ---------- clients ----------


def good_body(rng: random.Random, hidden: int, n_layers: int, max_tokens: int) -> dict:
    body = {
        "prompt": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "temperature": rng.choice([0, 0.7]),
        "seed": rng.randrange(1000),
        "n_completion_tokens": max_tokens,
        "stream": True,
    }
    if rng.random() < 0.5:  # steered and default rows in one job: exercises the per-row hooks
        vector = [rng.gauss(0, 1) for _ in range(hidden)]
        hook = f"blocks.{rng.randrange(n_layers)}.hook_resid_post"
        steer = {"hook": hook, "strength": 2.0, "steering_vector": vector}
        body |= {"types": ["STEERED", "DEFAULT"], "vectors": [steer]}
    return body


async def stream_one(client: httpx.AsyncClient, body: dict, stop_after: int | None) -> str:
    """One streaming request; `stop_after` frames then hang up (None: read to the end). Its outcome."""
    async with client.stream("POST", CHAT, json=body) as response:
        if response.status_code == 503:
            return "rejected"
        if response.status_code >= 400:
            await response.aread()
            return "failed"
        frames = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            frame = json.loads(line[6:])
            if "error" in frame:
                return "failed"
            frames += 1
            if stop_after is not None and frames >= stop_after:
                return "cancelled"  # leaving the block closes the connection mid-stream
        return "completed"


async def bad_one(client: httpx.AsyncClient, body: dict | str) -> str:
    if isinstance(body, str):  # JSON text httpx would not encode (it refuses lone surrogates)
        response = await client.post(CHAT, content=body.encode(), headers={"content-type": "application/json"})
    else:
        response = await client.post(CHAT, json=body)
    shaped = 400 <= response.status_code < 500 and isinstance(response.json().get("error"), str)  # Neuronpedia's shape
    return "bad_request" if shaped else "failed"


async def run_load(base: str, args: argparse.Namespace, shape: dict) -> Counter:
    rng = random.Random(args.seed)
    plan = []
    for _ in range(args.requests):
        roll = rng.random()
        if roll < args.bad_share:
            plan.append(("bad", rng.choice(BAD_BODIES), None))
        else:
            vanish = roll < args.bad_share + args.disconnect_share
            stop = rng.randint(1, max(1, args.max_tokens // 2)) if vanish else None
            plan.append(("stream", good_body(rng, shape["hidden_size"], shape["layers"], args.max_tokens), stop))
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    outcomes: Counter = Counter()

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(300.0)) as client:
            while not queue.empty():
                kind, body, stop = queue.get_nowait()
                try:
                    outcome = await (bad_one(client, body) if kind == "bad" else stream_one(client, body, stop))
                except (httpx.TransportError, json.JSONDecodeError):
                    outcome = "failed"
                outcomes[outcome] += 1

    tasks = [asyncio.create_task(client_loop()) for _ in range(args.clients)]
    done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
    for task in pending:
        task.cancel()
    outcomes["not_run"] = queue.qsize()
    outcomes["timed_out_clients"] = len(pending)
    return outcomes


# ---------- checks ----------


async def probe_text(client: httpx.AsyncClient) -> str:
    response = await client.post(CHAT, json={**PROBE, "stream": False})
    response.raise_for_status()
    return response.json()["outputs"][0]["raw"]


async def settle(client: httpx.AsyncClient, timeout: float = 60.0) -> dict:
    """/status once no request is running or waiting (or the last one seen at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await client.get("/status")).json()
        if (status["active_requests"] == 0 and status["queue_depth"] == 0) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


async def main_async(args: argparse.Namespace) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(port)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=300.0) as client:
            await wait_healthy(client, server)
            shape = (await client.get("/status")).json()
            before = await probe_text(client)
            warm = argparse.Namespace(**{**vars(args), "requests": min(args.clients, 8), "seed": args.seed + 1})
            await run_load(base, warm, shape)  # warm the allocator before the memory baseline
            await settle(client)
            rss_before = rss_bytes(server.pid)
            started = time.monotonic()
            outcomes = await run_load(base, args, shape)
            seconds = time.monotonic() - started
            status = await settle(client)
            rss_after = rss_bytes(server.pid)
            after = await probe_text(client)
    finally:
        server.terminate()
        server.wait(30)
    slack = max(args.memory_slack_mb * 2**20, 0.10 * rss_before)
    checks = {
        "all_requests_ran": outcomes["not_run"] == 0 and outcomes["timed_out_clients"] == 0,
        "no_failures": outcomes["failed"] == 0,
        "idle_after": status["active_requests"] == 0 and status["queue_depth"] == 0,
        "no_hook_left": status.get("hooks_attached", 0) == 0,
        "memory_back_to_baseline": rss_after - rss_before <= slack,
        "same_greedy_probe": before == after,
    }
    return {
        "clients": args.clients,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "seconds": round(seconds, 1),
        "outcomes": {k: outcomes[k] for k in ("completed", "cancelled", "bad_request", "rejected", "failed")},
        "engine": status.get("engine", {}),
        "hooks_attached": status.get("hooks_attached"),
        "rss_mb": {"before": round(rss_before / 2**20, 1), "after": round(rss_after / 2**20, 1)},
        "probe": {"before": before[-60:], "after": after[-60:]},
        "checks": checks,
        "ok": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    report = asyncio.run(main_async(parse_args(argv)))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
