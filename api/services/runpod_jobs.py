"""RunPod's queue API served by this process, so RunPod's own client (`runpod.Endpoint(...)` with
`runpod.endpoint_url_base` pointed here) runs jobs against a local server: /run, /runsync,
/status/{id}, /stream/{id}, /cancel/{id}, /health, under /v2/{endpoint_id}/ as on api.runpod.ai.

Jobs run at once as tasks of the event loop, so concurrent jobs share the engine's batches. A job
that fails is `{"status": "FAILED", "error": "<JSON text of {type, message, param}>"}` as RunPod
reports it (a string), but parseable. Finished jobs are kept for KEEP_S seconds (at most MAX_JOBS)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from api.schemas.common import error_body
from api.schemas.completion_chat import CompletionChatRequest
from api.services.completion_chat import start_completion_chat
from api.services.ports import ServerState
from infrastructure.errors import InvalidRequestError, PersonaError

log = logging.getLogger(__name__)

KEEP_S = 600.0
MAX_JOBS = 1024
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
_webhooks: set[asyncio.Task] = set()  # held until done (the loop keeps only weak references to tasks)


def job_error(type_: str, message: str, param: str | None = None) -> str:
    """A failed job's `error`: JSON text (RunPod's field is a string) of the one error object, never a Python repr."""
    return json.dumps(error_body(type_, message, param)["error"])


def validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return job_error("validation_error", f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)


def health_output(runtime: ServerState) -> dict:
    """The answer to `{"input": {"action": "health"}}`: readiness, model and engine load."""
    engine = runtime.engine
    out: dict[str, Any] = {"status": runtime.state, "model": runtime.loaded.model_id if runtime.loaded else None}
    if engine is not None:
        out |= {
            "queue_depth": engine.queue_depth,
            "active_requests": engine.active_requests,
            "max_batch_size": engine.max_batch_size,
            "max_batch": engine.stats["max_batch"],
        }
    return out


def is_health(job_input: Any) -> bool:
    return isinstance(job_input, dict) and job_input.get("action") == "health"


@dataclass
class RunPodJob:
    id: str
    job_input: Any
    status: str = "IN_QUEUE"
    frames: list[dict] = field(default_factory=list)
    streamed: int = 0
    output: Any = None
    error: str | None = None
    webhook: str | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    task: asyncio.Task | None = None

    def status_body(self) -> dict:
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            body["delayTime"] = int((self.started - self.created) * 1000)
        if self.ended is not None and self.started is not None:
            body["executionTime"] = int((self.ended - self.started) * 1000)
        if self.status == "COMPLETED":
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body

    def stream_body(self) -> dict:
        """The frames not yet streamed, as RunPod's `/stream` hands them out (`{"output": frame}` each)."""
        fresh, self.streamed = self.frames[self.streamed :], len(self.frames)
        body = {"id": self.id, "status": self.status, "stream": [{"output": f} for f in fresh]}
        if self.error is not None:
            body["error"] = self.error
        return body


async def run_job_input(runtime: ServerState, job: RunPodJob, timeout_s: float | None = None) -> None:
    """Run one job to its end, recording frames as they come and the final status."""
    job.status, job.started = "IN_PROGRESS", time.monotonic()
    try:
        if is_health(job.job_input):
            job.output = health_output(runtime)
        else:
            body = CompletionChatRequest.model_validate(job.job_input)
            stream = await start_completion_chat(runtime, body, timeout_s)
            try:
                async for item in stream.frames:
                    job.frames.append(item)
            finally:
                await stream.frames.aclose()
            job.output = job.frames
        job.status = "COMPLETED"
    except ValidationError as exc:
        job.status, job.error = "FAILED", validation_error(exc)
    except PersonaError as exc:
        job.status = "TIMED_OUT" if exc.type == "timeout" else "FAILED"
        job.error = job_error(exc.type, exc.message, exc.param)
    except asyncio.CancelledError:
        job.status = "CANCELLED"
        raise
    except Exception:
        log.exception("RunPod job %s failed", job.id)
        job.status, job.error = "FAILED", job_error("internal_error", "internal server error")
    finally:
        job.ended = time.monotonic()
        if job.webhook:
            task = asyncio.get_running_loop().create_task(send_webhook(job.webhook, job.status_body()))
            _webhooks.add(task)
            task.add_done_callback(_webhooks.discard)


def check_webhook(settings, url: str | None) -> None:
    """A webhook makes the server POST to a URL a client chose: only to hosts the operator listed (WEBHOOK_HOSTS)."""
    if url is None:
        return
    allowed = {h.strip().lower() for h in settings.webhook_hosts.split(",") if h.strip()}
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidRequestError("the webhook must be an http(s) URL", "webhook")
    if parsed.hostname.lower() not in allowed:
        why = "webhooks are off (WEBHOOK_HOSTS is empty)" if not allowed else "its host is not in WEBHOOK_HOSTS"
        raise InvalidRequestError(f"the webhook is refused: {why}", "webhook")


async def send_webhook(url: str, payload: dict) -> bool:
    """POST a finished job to its webhook (as RunPod does: up to 3 tries); failures are logged, not raised."""
    for attempt in range(3):
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(url, json=payload)
            if response.status_code < 400:
                return True
            log.warning("webhook %s answered %d", url, response.status_code)
        except httpx.HTTPError as exc:
            log.warning("webhook %s failed: %s", url, exc)
        await asyncio.sleep(0.5 * (attempt + 1))
    return False


class RunPodJobs:
    """The jobs of one app: submitted, running, and recently finished."""

    def __init__(self, runtime: ServerState) -> None:
        self.runtime = runtime
        self.jobs: dict[str, RunPodJob] = {}

    def _forget_old(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self.jobs.items()):
            if job.ended is not None and (now - job.ended > KEEP_S or len(self.jobs) > MAX_JOBS):
                del self.jobs[job_id]

    def start(self, job_input: Any, webhook: str | None, timeout_s: float | None) -> RunPodJob:
        self._forget_old()
        job = RunPodJob(id=f"local-{uuid.uuid4()}", job_input=job_input, webhook=webhook)
        job.task = asyncio.get_running_loop().create_task(run_job_input(self.runtime, job, timeout_s))
        self.jobs[job.id] = job
        return job

    def get(self, job_id: str) -> RunPodJob | None:
        return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> RunPodJob | None:
        job = self.jobs.get(job_id)
        if job is not None and job.status not in FINAL and job.task is not None:
            job.task.cancel()
            job.status = "CANCELLED"
        return job
