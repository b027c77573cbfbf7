"""Prometheus metrics: HTTP requests by route and status (prometheus-fastapi-instrumentator), and the
engine's tokens, queue depth, batch size, time to first token and inter-token latency.

Latencies are measured as the engine hands out each event (an observer on `engine.observers`, attached
once when the runtime attaches the engine); gauges are read from the engine at scrape time. Each app has
its own registry (tests build several apps in one process)."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_fastapi_instrumentator import Instrumentator

from infrastructure.engine.job import Event, GenerationJob, JobFailed, RowFinished, RowToken

if TYPE_CHECKING:
    from api.services.ports import ServerState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineMetrics:
    """Per-engine token and latency series, fed by the engine's observers (`engine.observers`): every event
    handed to a job passes through `event` on the inference thread, stamped when it leaves the engine."""

    def __init__(self) -> None:
        kw = {"buckets": LATENCY_BUCKETS, "registry": None}
        self.ttft = Histogram("persona_time_to_first_token_seconds", "Submit to first token.", **kw)
        self.itl = Histogram("persona_inter_token_latency_seconds", "Gap between tokens of one row.", **kw)
        self.tokens = Counter("persona_tokens_generated", "Completion tokens of finished rows.", registry=None)
        self.jobs = Counter("persona_jobs", "Jobs by outcome.", ["outcome"], registry=None)
        self._open: weakref.WeakKeyDictionary[GenerationJob, _JobClock] = weakref.WeakKeyDictionary()

    def collectors(self) -> list[Any]:
        return [self.ttft, self.itl, self.tokens, self.jobs]

    def event(self, job: GenerationJob, event: Event) -> None:
        now = time.monotonic()
        clock = self._open.get(job)
        if clock is None:
            clock = self._open[job] = _JobClock()
        if isinstance(event, RowToken):
            if not clock.last:
                self.ttft.observe(now - job.submitted_at)
            elif event.row in clock.last:
                self.itl.observe(now - clock.last[event.row])
            clock.last[event.row] = now
        elif isinstance(event, RowFinished):
            self.tokens.inc(event.completion_tokens)
            clock.finished += 1
            if clock.finished == len(job.rows):
                self._close(job, "completed")
        elif isinstance(event, JobFailed):
            self._close(job, event.error.type)

    def cancelled(self, job: GenerationJob) -> None:
        self._close(job, "cancelled")

    def _close(self, job: GenerationJob, outcome: str) -> None:
        self._open.pop(job, None)
        self.jobs.labels(outcome).inc()


@dataclass
class _JobClock:
    last: dict[int, float] = field(default_factory=dict)  # row -> time of its last token
    finished: int = 0


def instrument_engine(engine: Any) -> EngineMetrics:
    """Subscribe (once) an EngineMetrics to the engine's observers."""
    metrics = getattr(engine, "metrics", None)
    if isinstance(metrics, EngineMetrics):
        return metrics
    metrics = EngineMetrics()
    engine.observers.subscribe(event=metrics.event, cancelled=metrics.cancelled)
    engine.metrics = metrics
    return metrics


class RuntimeCollector:
    """Scrape-time view of the engine: queue depth, active requests, batch sizes, steps."""

    def __init__(self, runtime: ServerState) -> None:
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
            ("persona_kv_preemptions", "Rows preempted for lack of KV blocks (recomputed later).", "preemptions"),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(stats.get(key, 0)))
            yield counter
        kv = engine.kv_stats() if hasattr(engine, "kv_stats") else {}
        for name, doc, key in (
            ("persona_kv_blocks_total", "Blocks in the paged KV cache.", "kv_blocks_total"),
            ("persona_kv_blocks_used", "KV blocks held by rows (unused cached ones count as free).", "kv_blocks_used"),
            ("persona_kv_block_size", "Token positions per KV block.", "kv_block_size"),
            ("persona_prefix_cache_hit_rate", "Looked-up prompt tokens found in the prefix cache.", "prefix_hit_rate"),
        ):
            if key in kv:
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], float(kv[key]))
                yield gauge
        metrics = getattr(engine, "metrics", None)
        if isinstance(metrics, EngineMetrics):
            for collector in metrics.collectors():
                yield from collector.collect()


def install_metrics(app: FastAPI, runtime: ServerState) -> CollectorRegistry:
    """Instrument HTTP requests and serve GET /metrics from this app's own registry."""
    registry = CollectorRegistry()
    Instrumentator(registry=registry, should_group_status_codes=False, excluded_handlers=["/metrics"]).instrument(app)
    registry.register(RuntimeCollector(runtime))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.state.metrics_registry = registry
    return registry
