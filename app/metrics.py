"""Prometheus metrics: HTTP requests by route and status (prometheus-fastapi-instrumentator), and the
engine's tokens, queue depth, batch size, time to first token and inter-token latency.

Latencies are measured on the event-loop side, by wrapping the engine's event stream once when the
runtime attaches it; gauges are read from the engine at scrape time. Each app has its own registry
(tests build several apps in one process)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_fastapi_instrumentator import Instrumentator

from infrastructure.engine.job import Event, GenerationJob, JobFailed, RowFinished, RowToken

if TYPE_CHECKING:
    from app.runtime import Runtime

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineMetrics:
    """Per-engine token and latency series, fed from the event streams of every job."""

    def __init__(self) -> None:
        kw = {"buckets": LATENCY_BUCKETS, "registry": None}
        self.ttft = Histogram("persona_time_to_first_token_seconds", "Submit to first token.", **kw)
        self.itl = Histogram("persona_inter_token_latency_seconds", "Gap between tokens of one row.", **kw)
        self.tokens = Counter("persona_tokens_generated", "Completion tokens of finished rows.", registry=None)
        self.jobs = Counter("persona_jobs", "Jobs by outcome.", ["outcome"], registry=None)

    def collectors(self) -> list[Any]:
        return [self.ttft, self.itl, self.tokens, self.jobs]

    async def observe(self, job: GenerationJob, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """Pass a job's events through, timing tokens; closing this closes (and cancels) the job."""
        last: dict[int, float] = {}
        outcome = "cancelled"
        try:
            async for event in events:
                now = time.monotonic()
                if isinstance(event, RowToken):
                    if not last:
                        self.ttft.observe(now - job.submitted_at)
                    elif event.row in last:
                        self.itl.observe(now - last[event.row])
                    last[event.row] = now
                elif isinstance(event, RowFinished):
                    self.tokens.inc(event.completion_tokens)
                elif isinstance(event, JobFailed):
                    outcome = event.error.type
                yield event
            if outcome == "cancelled":
                outcome = "completed"
        finally:
            await events.aclose()
            self.jobs.labels(outcome).inc()


def instrument_engine(engine: Any) -> EngineMetrics:
    """Wrap `engine.submit` (once) so every job's events feed the engine's metrics."""
    metrics = getattr(engine, "metrics", None)
    if isinstance(metrics, EngineMetrics):
        return metrics
    metrics = EngineMetrics()
    submit = engine.submit

    def metered_submit(job: GenerationJob) -> AsyncIterator[Event]:
        return metrics.observe(job, submit(job))

    engine.submit = metered_submit
    engine.metrics = metrics
    return metrics


class RuntimeCollector:
    """Scrape-time view of the engine: queue depth, active requests, batch sizes, steps."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self):
        engine = self.runtime.engine
        up = GaugeMetricFamily("persona_engine_up", "1 when the engine serves, 0 while loading or broken.")
        up.add_metric([], 1.0 if self.runtime.state == "ok" else 0.0)
        yield up
        if engine is None:
            return
        stats = engine.stats
        for name, doc, value in (
            ("persona_queue_depth", "Jobs waiting for room in the batch.", engine.queue_depth),
            ("persona_active_requests", "Jobs with rows in the running batch.", engine.active_requests),
            ("persona_batch_size", "Rows in the last decode step.", stats.get("last_batch", 0)),
            ("persona_batch_size_max", "Largest decode batch so far.", stats.get("max_batch", 0)),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(value))
            yield gauge
        for name, doc, key in (
            ("persona_decode_steps", "Decode forwards run.", "steps"),
            ("persona_engine_tokens", "Tokens sampled by the engine (warm-up included).", "tokens"),
            ("persona_failed_batches", "Prefill or decode batches that failed (their jobs failed).", "failed_batches"),
            ("persona_failed_rows", "Rows failed alone (non-finite logits); their batch went on.", "failed_rows"),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(stats.get(key, 0)))
            yield counter
        metrics = getattr(engine, "metrics", None)
        if isinstance(metrics, EngineMetrics):
            for collector in metrics.collectors():
                yield from collector.collect()


def install_metrics(app: FastAPI, runtime: Runtime) -> CollectorRegistry:
    """Instrument HTTP requests and serve GET /metrics from this app's own registry."""
    registry = CollectorRegistry()
    Instrumentator(registry=registry, should_group_status_codes=False, excluded_handlers=["/metrics"]).instrument(app)
    registry.register(RuntimeCollector(runtime))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.state.metrics_registry = registry
    return registry
