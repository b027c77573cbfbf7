"""SIGTERM drains (issue 20, item 8): the server keeps answering (503 for new work, /health "stopping"),
running completion-chat streams get SHUTDOWN_TIMEOUT_S to finish with their final frame, and a stream
still running then ends with an error frame instead of being cut."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx

from app.factory import create_app
from app.runtime import Runtime
from app.serve import build_server
from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.steering.hooks import our_hooks
from tests.api.live_server import serve
from tests.app.support import GREEDY_PROBE, settles

CHAT = "/v1/steer/completion-chat"


def chat(n: int) -> dict:
    prompt = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    return {"prompt": prompt, "temperature": 0, "n_completion_tokens": n, "stream": True}


async def frames(lines) -> list[dict]:
    return [json.loads(line[6:]) async for line in lines if line.startswith("data: ")]


async def test_sigterm_drains_streams_then_ends_the_rest_with_an_error_frame(engine, loaded_model):
    assert await settles(lambda: engine.active_requests == 0 and engine.queue_depth == 0)
    small = PersonaEngine(loaded_model, max_batch_size=4)  # the session engine is idle meanwhile
    small.start()
    assert small.wait_ready(120), small.broken
    settings = Settings(_env_file=None, shutdown_timeout_s=8)
    runtime = Runtime(settings)  # owns (and stops) the small engine
    runtime.attach(loaded_model, small)
    app = create_app(settings, runtime=runtime)
    server = build_server(settings, app, log_level="warning")
    with serve(app, server=server) as url:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            async with c.stream("POST", CHAT, json=chat(6)) as short, c.stream("POST", CHAT, json=chat(3000)) as long:
                short_lines, long_lines = short.aiter_lines(), long.aiter_lines()
                while not (await anext(short_lines)).startswith("data: "):
                    pass
                server.handle_exit(signal.SIGTERM, None)
                assert await settles(lambda: runtime.state == "stopping", 5)
                refused = await c.post("/api/v1/generate/baseline", json=GREEDY_PROBE)
                health = await c.get("/health")
                short_frames, long_frames = await asyncio.gather(frames(short_lines), frames(long_lines))
        assert await settles(lambda: server.should_exit, 30)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "engine_unavailable"
    assert health.status_code == 503 and health.json() == {"status": "stopping"}
    assert "assistant_axis" in short_frames[-1]  # drained: the final frame came
    last = long_frames[-1]  # Neuronpedia's mid-stream error frame: the text so far, the message as `error`
    assert last["type"] == "engine_unavailable" and isinstance(last["error"], str) and "outputs" in last
    assert "outputs" in long_frames[0]
    assert our_hooks(loaded_model.model) == []
