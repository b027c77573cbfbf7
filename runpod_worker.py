"""RunPod serverless worker: seed 000's completion-chat on this service's engine.

`python runpod_worker.py` (in a RunPod container) takes jobs `{"input": {...completion-chat body}}`
and streams the same cumulative frames as `POST /v1/steer/completion-chat`, aggregated into the
job's `output` list (`return_aggregate_stream`). Locally, `python runpod_worker.py --test_input
'{"input": {...}}'` runs one job and prints `Job result: {'output': [frames...]}`."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import AsyncIterator

from pydantic import ValidationError

from api.schemas.completion_chat import CompletionChatRequest
from api.services.completion_chat import guarded, start_completion_chat
from api.services.completion_chat_frames import error_frame
from app.runtime import Runtime
from app.settings import Settings
from infrastructure.errors import PersonaError

RUNTIME: Runtime | None = None


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


def validation_frame(exc: ValidationError) -> dict:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return error_frame("validation_error", f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)


async def handler(job: dict) -> AsyncIterator[dict]:
    """Yield the job's frames; a bad input or a failure is one `{"error": ...}` frame (RunPod marks the job failed)."""
    try:
        body = CompletionChatRequest.model_validate(job.get("input") or {})
        frames = await start_completion_chat(load_runtime(), body)
    except ValidationError as exc:
        yield validation_frame(exc)
        return
    except PersonaError as exc:
        yield error_frame(exc.type, exc.message, exc.param)
        return
    async for item in guarded(frames):
        yield item


async def aggregated(job: dict) -> list[dict] | dict:
    """The handler's frames as one list (what `return_aggregate_stream` makes of them on RunPod), or `{"error"}`."""
    frames = [item async for item in handler(job)]
    if frames and "error" in frames[-1]:
        return {"error": frames[-1]["error"]}
    return frames


def sdk_runs_local_test() -> bool:
    """True when the SDK will run one local job (`--test_input` / test_input.json) through `run_job`,
    which (runpod 1.12) awaits the handler's return instead of iterating a generator."""
    serving = "--rp_serve_api" in sys.argv or os.environ.get("RUNPOD_REALTIME_PORT")
    return not serving and ("--test_input" in sys.argv or os.environ.get("RUNPOD_WEBHOOK_GET_JOB") is None)


def main() -> None:
    import runpod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_runtime()
    entry = aggregated if sdk_runs_local_test() else handler
    runpod.serverless.start({"handler": entry, "return_aggregate_stream": True})


if __name__ == "__main__":
    main()
