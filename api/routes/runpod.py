"""RunPod's queue API under /v2/{endpoint_id}/ (any endpoint id), for RunPod's own client in development:
`runpod.endpoint_url_base = "http://127.0.0.1:8000/v2"`, then `runpod.Endpoint("local").run_sync(...)`,
`.run(...)` with `job.status()`, `job.output()`, `job.stream()`, `job.cancel()`, `endpoint.health()`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api.deps import RuntimeDep
from api.routing import NeuronpediaRoute
from api.schemas.common import StrictModel
from api.schemas.completion_chat import RunPodPolicy
from api.schemas.steer_wire import BothCasings
from api.services.runpod_jobs import FINAL, RunPodJobs, check_webhook

router = APIRouter(prefix="/v2/{endpoint_id}", route_class=NeuronpediaRoute, tags=["RunPod queue API (local)"])


class RunPodRequest(BothCasings):
    """RunPod's request envelope; `input` is a completion-chat body (either casing) or `{"action": "health"}`."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [{"input": {"action": "health"}}]}}

    input: dict[str, Any]
    webhook: str | None = Field(default=None, max_length=2000)
    policy: RunPodPolicy | None = None
    s3_config: dict[str, Any] | None = None


async def jobs_of(request: Request) -> RunPodJobs:
    state = request.app.state
    if getattr(state, "runpod_jobs", None) is None:
        state.runpod_jobs = RunPodJobs(state.runtime)
    return state.runpod_jobs


JobsDep = Annotated[RunPodJobs, Depends(jobs_of)]


def timeout_of(body: RunPodRequest) -> float | None:
    return body.policy.execution_timeout / 1000 if body.policy and body.policy.execution_timeout else None


def unknown(job_id: str) -> JSONResponse:
    return JSONResponse({"error": f"job {job_id!r} not found", "type": "not_found"}, status_code=404)


@router.post("/run", summary="Queue a job (it starts at once)")
async def run(endpoint_id: str, body: RunPodRequest, jobs: JobsDep) -> dict:
    check_webhook(jobs.runtime.settings, body.webhook)
    job = jobs.start(body.input, body.webhook, timeout_of(body))
    return {"id": job.id, "status": job.status}


@router.post("/runsync", summary="Run a job to its end")
async def runsync(endpoint_id: str, body: RunPodRequest, jobs: JobsDep) -> dict:
    """RunPod's answer whatever the job did: `status` COMPLETED with `output` (every frame), or FAILED with `error`."""
    check_webhook(jobs.runtime.settings, body.webhook)
    job = jobs.start(body.input, body.webhook, timeout_of(body))
    await job.task
    return job.status_body()


@router.get("/status/{job_id}", summary="A job's status (and output when done)")
@router.post("/status/{job_id}", include_in_schema=False)  # as the SDK's own local API (rp_fastapi) takes it
async def status(endpoint_id: str, job_id: str, jobs: JobsDep):
    job = jobs.get(job_id)
    return unknown(job_id) if job is None else job.status_body()


@router.get("/stream/{job_id}", summary="A job's frames since the last call")
@router.post("/stream/{job_id}", include_in_schema=False)
async def stream(endpoint_id: str, job_id: str, jobs: JobsDep):
    job = jobs.get(job_id)
    return unknown(job_id) if job is None else job.stream_body()


@router.post("/cancel/{job_id}", summary="Cancel a job")
async def cancel(endpoint_id: str, job_id: str, jobs: JobsDep):
    job = jobs.cancel(job_id)
    return unknown(job_id) if job is None else {"id": job.id, "status": job.status}


@router.get("/health", summary="Jobs and workers, as RunPod's endpoint health")
async def health(endpoint_id: str, jobs: JobsDep, runtime: RuntimeDep) -> dict:
    counts = {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0}
    for job in jobs.jobs.values():
        key = {"COMPLETED": "completed", "IN_PROGRESS": "inProgress", "IN_QUEUE": "inQueue"}.get(job.status)
        counts[key or ("failed" if job.status in FINAL else "inQueue")] += 1
    workers = {"idle": int(runtime.state == "ok"), "running": 0, "initializing": int(runtime.state == "loading")}
    return {"jobs": counts, "workers": workers}
