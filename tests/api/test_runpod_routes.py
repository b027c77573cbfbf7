"""RunPod's own client (`runpod.Endpoint`, base URL pointed at a local server) against the /v2/{endpoint}
queue API; RunPod's request fields on /runsync; the load-balancing probe /ping and path /generate."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.api.live_server import serve

CHAT = {
    "prompt": [{"role": "user", "content": "Name three colours."}],
    "types": ["STEERED", "DEFAULT"],
    "vectors": [{"hook": "blocks.15.hook_resid_post", "strength": 40.0, "steering_vector": [0.05] * 576}],
    "temperature": 0,
    "n_completion_tokens": 8,
}


@pytest.fixture
def endpoint(app, monkeypatch):
    """`runpod.Endpoint("local")` talking to the session app served on 127.0.0.1."""
    import runpod

    with serve(app) as base:
        monkeypatch.setattr(runpod, "endpoint_url_base", f"{base}/v2")
        yield runpod.Endpoint("local", api_key="local-dev"), base


def last_outputs(frames: list[dict]) -> dict[str, str]:
    return {o["type"]: o["raw"] for o in frames[-1]["outputs"]}


async def test_sdk_run_sync_run_status_stream_and_health(endpoint, client):
    ep, _ = endpoint
    expected = (await client.post("/runsync", json={"input": CHAT})).json()["output"]
    frames = await asyncio.to_thread(ep.run_sync, {"input": CHAT}, 120)
    assert last_outputs(frames) == last_outputs(expected)
    job = await asyncio.to_thread(ep.run, CHAT)  # the SDK wraps a bare input itself
    streamed = await asyncio.to_thread(lambda: list(job.stream()))
    assert streamed and last_outputs(streamed) == last_outputs(expected)
    assert await asyncio.to_thread(job.status) == "COMPLETED"
    assert last_outputs(await asyncio.to_thread(job.output)) == last_outputs(expected)
    health = await asyncio.to_thread(ep.health)
    assert health["workers"]["idle"] == 1 and health["jobs"]["completed"] >= 2
    probe = await asyncio.to_thread(ep.run_sync, {"input": {"action": "health"}}, 30)
    assert probe["status"] == "ok" and probe["max_batch_size"] >= 2


async def test_two_sdk_jobs_share_a_batch(endpoint, engine):
    """Jobs run concurrently: two two-row jobs in one decode step, as the engine's batch counter shows."""
    ep, _ = endpoint
    long = CHAT | {"n_completion_tokens": 24}
    engine.stats["max_batch"] = 0  # the session engine's high-water mark, for this test only
    jobs = [await asyncio.to_thread(ep.run, {"input": long}) for _ in range(2)]
    outputs = [await asyncio.to_thread(job.output, 120) for job in jobs]
    assert last_outputs(outputs[0]) == last_outputs(outputs[1])  # same greedy request, same text
    assert engine.stats["max_batch"] == 4  # 2 jobs x (STEERED, DEFAULT) in one batch; one job alone is 2


async def test_failed_job_is_a_json_error_and_unknown_jobs_are_404(endpoint):
    _, base = endpoint
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        r = await c.post("/v2/local/runsync", json={"input": {"prompt": [{"role": "user", "content": "x"}],
                                                              "types": ["STEERED"]}})  # fmt: skip
        assert r.status_code == 200 and r.json()["status"] == "FAILED"
        error = json.loads(r.json()["error"])  # JSON text, not a Python repr
        assert error["type"] == "invalid_request_error" and error["param"] == "vectors"
        r = await c.post("/v2/local/runsync", json={"input": {"prompt": "not a list"}})
        assert json.loads(r.json()["error"])["param"] == "prompt"
        missing = await c.get("/v2/local/status/nope")
        assert missing.status_code == 404 and "nope" in missing.json()["error"]


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []
    arrived = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.received.append(json.loads(body))
        Receiver.arrived.set()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        return None


async def test_webhooks_go_only_to_listed_hosts(client, runtime, monkeypatch):
    """A webhook makes the server POST where the client says: refused (400 naming it) unless WEBHOOK_HOSTS lists
    the host, on every route that takes one, before any model work."""
    body = {"input": CHAT, "webhook": "http://169.254.169.254/latest"}
    for path in ("/runsync", "/v2/local/run", "/v2/local/runsync"):
        r = await client.post(path, json=body)
        assert r.status_code == 400 and r.json()["param"] == "webhook" and "WEBHOOK_HOSTS" in r.json()["error"], path
    monkeypatch.setattr(runtime.settings, "webhook_hosts", "hooks.example")
    r = await client.post("/runsync", json=body)
    assert r.status_code == 400 and "not in WEBHOOK_HOSTS" in r.json()["error"]
    r = await client.post("/runsync", json={"input": CHAT, "webhook": "file:///etc/passwd"})
    assert r.status_code == 400 and r.json()["param"] == "webhook"


async def test_runsync_accepts_runpods_request_fields_and_calls_the_webhook(client, runtime, monkeypatch):
    monkeypatch.setattr(runtime.settings, "webhook_hosts", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = f"http://127.0.0.1:{server.server_address[1]}/done"
        body = {"input": CHAT, "id": "job-7", "webhook": hook, "policy": {"executionTimeout": 120000, "ttl": 60000},
                "s3Config": {"accessId": "a", "accessSecret": "b", "bucketName": "c", "endpointUrl": "d"}}  # fmt: skip
        r = await client.post("/runsync", json=body)
        assert r.status_code == 200 and r.json()["id"] == "job-7"
        assert await asyncio.to_thread(Receiver.arrived.wait, 30)
        assert Receiver.received[-1]["id"] == "job-7" and Receiver.received[-1]["output"] == r.json()["output"]
        short = await client.post("/runsync", json={"input": CHAT | {"n_completion_tokens": 200},
                                                    "policy": {"executionTimeout": 1}})  # fmt: skip
        assert short.status_code == 504 and short.json()["type"] == "timeout"
    finally:
        server.shutdown()


async def test_load_balancing_ping_and_generate(client, loaded_model, engine):
    from app.factory import create_app
    from app.runtime import Runtime
    from app.settings import Settings
    from tests.app.support import client_for

    assert (await client.get("/ping")).json() == {"status": "healthy"}
    r = await client.post("/generate", json=CHAT | {"types": ["DEFAULT"], "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    settings = Settings(_env_file=None, secret="s3cret")
    secured = Runtime(settings, owns_engine=False)
    secured.attach(loaded_model, engine)
    async with client_for(create_app(settings, runtime=secured)) as c:
        assert (await c.get("/ping")).status_code == 200  # RunPod's probe carries no secret
        assert (await c.post("/generate", json=CHAT)).status_code == 401
    loading = Runtime(settings, load_error=None)
    loading.load_in_background = lambda: None  # stays "loading" for this check
    async with client_for(create_app(settings, runtime=loading)) as c:
        assert (await c.get("/ping")).status_code == 204
