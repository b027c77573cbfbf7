"""RunPod serverless worker: Neuronpedia's completion-chat on this service's engine, in either of RunPod's modes.

Queue mode (the default; `python runpod_worker.py` as the container's command): jobs
`{"input": {...completion-chat body, either casing}}` stream the same cumulative frames as
`POST /v1/steer/completion-chat`, aggregated into the job's `output` (`return_aggregate_stream`).
Several jobs run at once in one worker (`concurrency_modifier`: RUNPOD_CONCURRENCY, at most the
engine's room, MAX_BATCH_SIZE // 2 two-row jobs), so the engine batches them. A failed job's `error`
is the JSON text of `{"type", "message", "param"}`. `{"input": {"action": "health"}}` answers the
worker's state. Locally, `python runpod_worker.py --test_input '{"input": {...}}'` runs one job.

Load-balancing mode (`python runpod_worker.py --load-balancing`, or RUNPOD_MODE=load_balancing): the
HTTP app itself on HOST:PORT, where RunPod forwards `/generate` (and every other route), with `/ping`
(200 ready, 204 loading) on PORT_HEALTH too when RunPod's health port differs from PORT."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator

from pydantic import ValidationError

from api.schemas.completion_chat import CompletionChatRequest
from api.services.completion_chat import start_completion_chat
from api.services.runpod_jobs import health_output, is_health, job_error, validation_error
from app.runtime import Runtime
from app.settings import Settings
from infrastructure.errors import PersonaError

log = logging.getLogger("runpod_worker")
RUNTIME: Runtime | None = None
ROWS_PER_JOB = 2  # a job generates at most STEERED and DEFAULT


def load_runtime() -> Runtime:
    """Load the model and start the engine once per worker process, as the app's lifespan does."""
    global RUNTIME
    if RUNTIME is None:
        runtime = Runtime(Settings())
        runtime.load()
        if runtime.load_error:
            raise SystemExit(f"model load failed: {runtime.load_error}")
        RUNTIME = runtime
        # stop the inference thread before the interpreter tears torch down (a live daemon thread
        # there can abort the process at exit: "terminate called without an active exception")
        atexit.register(runtime.shutdown, 5.0)
    return RUNTIME


def worker_concurrency(max_batch_size: int, requested: int = 0) -> int:
    """Jobs one worker takes at once: RUNPOD_CONCURRENCY (0: all that fit), bounded by the engine's batch
    (each job may need two rows). Constant: the SDK only resizes its job queue once it is empty."""
    room = max(1, max_batch_size // ROWS_PER_JOB)
    return min(requested or room, room)


def concurrency_modifier(current: int) -> int:
    """RunPod's hook, called before each job take; the engine's settings decide."""
    settings = load_runtime().settings
    return worker_concurrency(settings.max_batch_size, settings.runpod_concurrency)


async def handler(job: dict) -> AsyncIterator[dict]:
    """Yield the job's frames; a bad input or a failure ends it with `{"error": "<JSON text>"}`, which the
    SDK turns into the failed job's `error` string."""
    job_input = job.get("input") or {}
    runtime = load_runtime()
    if is_health(job_input):
        yield health_output(runtime)
        return
    try:
        body = CompletionChatRequest.model_validate(job_input)
        stream = await start_completion_chat(runtime, body)
    except ValidationError as exc:
        yield {"error": validation_error(exc)}
        return
    except PersonaError as exc:
        yield {"error": job_error(exc.type, exc.message, exc.param)}
        return
    try:
        async for item in stream.frames:
            yield item
    except PersonaError as exc:
        yield {"error": job_error(exc.type, exc.message, exc.param)}
    except Exception:
        log.exception("job %s failed", job.get("id"))
        yield {"error": job_error("internal_error", "internal server error")}
    finally:
        await stream.frames.aclose()


async def aggregated(job: dict) -> list[dict] | dict:
    """The handler's frames as one list (what `return_aggregate_stream` makes of them on RunPod), or `{"error"}`;
    a health check's answer as is."""
    frames = [item async for item in handler(job)]
    if frames and "error" in frames[-1]:
        return {"error": frames[-1]["error"]}
    if is_health(job.get("input")):
        return frames[0]
    return frames


def sdk_runs_local_test() -> bool:
    """True when the SDK will run one local job (`--test_input` / test_input.json) through `run_job`,
    which (runpod 1.12) awaits the handler's return instead of iterating a generator."""
    serving = "--rp_serve_api" in sys.argv or os.environ.get("RUNPOD_REALTIME_PORT")
    return not serving and ("--test_input" in sys.argv or os.environ.get("RUNPOD_WEBHOOK_GET_JOB") is None)


def load_balancing() -> bool:
    return "--load-balancing" in sys.argv or os.environ.get("RUNPOD_MODE", "").lower() in ("load_balancing", "lb")


def serve_load_balancing() -> None:
    """The HTTP app on HOST:PORT (RunPod forwards there), and `/ping` alone on PORT_HEALTH when that differs."""
    import uvicorn
    from fastapi import FastAPI

    from api.routes import health
    from app.factory import create_app

    settings = Settings()
    runtime = Runtime(settings)
    app = create_app(settings, runtime=runtime)
    health_port = settings.port_health or settings.port
    if health_port != settings.port:
        probe = FastAPI(title="RunPod health", docs_url=None, redoc_url=None, openapi_url=None)
        probe.state.runtime = runtime
        probe.include_router(health.router)
        server = uvicorn.Server(uvicorn.Config(probe, host=settings.host, port=health_port, log_level="warning"))
        threading.Thread(target=server.run, name="runpod-ping", daemon=True).start()
    uvicorn.run(app, host=settings.host, port=settings.port)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if load_balancing():
        serve_load_balancing()
        return
    import runpod

    load_runtime()
    entry = aggregated if sdk_runs_local_test() else handler
    runpod.serverless.start(
        {"handler": entry, "return_aggregate_stream": True, "concurrency_modifier": concurrency_modifier}
    )


if __name__ == "__main__":
    main()
