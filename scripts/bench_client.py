"""HTTP side of the serving benchmark: the real server in a thread, SSE clients, and latency statistics."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx

CHAT_ROUTE = "/v1/steer/completion-chat"


def http_stack() -> str:
    """What uvicorn's "auto" picks here: uvloop and httptools where they import (the lock installs both), else
    asyncio and h11 (a GPU machine without them measures a slower HTTP side than users get)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return loop + "+" + ("httptools" if importlib.util.find_spec("httptools") else "h11")


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 and a free port, in a daemon thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class StreamResult:
    """Client-side timings of one SSE request (perf_counter seconds)."""

    started: float
    token_frames: list[float] = field(default_factory=list)  # arrival time of every frame before the last
    ended: float = 0.0
    final: dict = field(default_factory=dict)

    @property
    def ttft(self) -> float:
        return (self.token_frames[0] if self.token_frames else self.ended) - self.started

    @property
    def gaps(self) -> list[float]:
        t = self.token_frames
        return [b - a for a, b in zip(t, t[1:])]


async def stream_chat(client: httpx.AsyncClient, body: bytes) -> StreamResult:
    """POST one JSON-encoded completion-chat request with stream: true and time every SSE frame."""
    result = StreamResult(started=time.perf_counter())
    times: list[float] = []
    last = ""
    headers = {"content-type": "application/json"}
    async with client.stream("POST", CHAT_ROUTE, content=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{CHAT_ROUTE} answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data:"):  # only timestamps here: the client shares this process with the server
                times.append(time.perf_counter())
                last = line
    result.ended = time.perf_counter()
    final = json.loads(last[5:]) if last else {"error": "no frames"}
    if "error" in final:
        raise RuntimeError(f"stream failed: {final['error']}")
    result.token_frames = times[:-1]  # the last frame is the final one (sent after every row finished)
    result.final = final
    return result


async def run_concurrent(base_url: str, bodies: list[dict]) -> tuple[list[StreamResult], float]:
    """Send every body at once; the results and the wall time from first send to last byte. Bodies are encoded
    before the clock starts: 64 real clients encode their own in parallel, this one process would in turn
    (a 3,584-float vector takes ~1.5 ms) before any request leaves, inside the first clients' timings."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    encoded = [json.dumps(body).encode() for body in bodies]
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(3600.0), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(client, body) for body in encoded))
    return list(results), max(r.ended for r in results) - started


async def run_arrivals(base_url: str, bodies: list[dict], offsets: list[float]) -> tuple[list[StreamResult], float]:
    """Send body i at `offsets[i]` seconds after the start (an open-loop arrival process); results and wall time."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    encoded = [json.dumps(body).encode() for body in bodies]
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(3600.0), limits=limits) as client:
        started = time.perf_counter()

        async def later(body: bytes, at: float) -> StreamResult:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            return await stream_chat(client, body)

        results = await asyncio.gather(*(later(b, at) for b, at in zip(encoded, offsets)))
    return list(results), max(r.ended for r in results) - started


def run_arrivals_sync(base_url: str, bodies: list[dict], offsets: list[float]) -> tuple[list[StreamResult], float]:
    return asyncio.run(run_arrivals(base_url, bodies, offsets))


def run_concurrent_sync(base_url: str, bodies: list[dict]) -> tuple[list[StreamResult], float]:
    """`run_concurrent` for a worker process: the clients then do not share the server's GIL."""
    return asyncio.run(run_concurrent(base_url, bodies))


def floor_app():
    """An app that answers CHAT_ROUTE at once with two SSE frames (no model): the HTTP floor's server. It records
    when each request's body was read (`app.state.arrivals`, perf_counter)."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def chat(request):
        await request.body()
        request.app.state.arrivals.append(time.perf_counter())

        async def frames():
            yield b'data: {"token": 1}\n\n'
            yield b'data: {"done": true}\n\n'

        return StreamingResponse(frames(), media_type="text/event-stream")

    app = Starlette(routes=[Route(CHAT_ROUTE, chat, methods=["POST"])])
    app.state.arrivals = []
    return app


def http_floor(clients, bodies: list[dict]) -> dict:
    """The W2 bodies, sent the same way (`clients`: the worker pool the workloads use) to `floor_app` on a server
    of its own: what the client harness, uvicorn and the machine's loopback network cost before any server work,
    the floor under W2's time to first token and its "requests reach the engine"."""
    app = floor_app()
    with ServerThread(app) as server:
        results, _ = clients.submit(run_concurrent_sync, server.url, bodies).result()
    arrivals, started = app.state.arrivals, [r.started for r in results]
    ttft = [r.ttft for r in results]
    return {
        "requests": len(results),
        "to_server_p50_ms": 1000 * (statistics.median(arrivals) - statistics.median(started)),
        "first_arrival_ms": 1000 * (min(arrivals) - min(started)),
        "arrival_spread_ms": 1000 * (max(arrivals) - min(arrivals)),
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def latency_summary(results: list[StreamResult]) -> dict:
    """p50/p99 time to first token and inter-token latency, in milliseconds."""
    ttfts = [r.ttft for r in results]
    gaps = [g for r in results for g in r.gaps] or [0.0]
    return {
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(gaps, 50),
        "itl_p99_ms": 1000 * percentile(gaps, 99),
    }
