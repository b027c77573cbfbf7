"""Prometheus /metrics, request ids echoed in X-Request-ID, and JSON log lines carrying them."""

from __future__ import annotations

import json
import logging
import re

from prometheus_client.parser import text_string_to_metric_families

from app.request_id import JsonFormatter
from tests.app.support import GREEDY_PROBE, client_for

BASELINE = "/api/v1/generate/baseline"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_tokens_and_latencies(make_app):
    app = make_app()
    async with client_for(app) as c:
        before = samples((await c.get("/metrics")).text)
        answer = (await c.post(BASELINE, json=GREEDY_PROBE)).json()
        await c.get("/api/v1/traits/no-such-trait")
        response = await c.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)
    n = answer["usage"]["completion_tokens"]
    assert n >= 2
    ok = {"handler": BASELINE, "method": "POST", "status": "200"}
    assert value(after, "http_requests_total", **ok) == value(before, "http_requests_total", **ok) + 1
    assert value(after, "http_requests_total", handler="/api/v1/traits/{name}", method="GET", status="404") >= 1
    grew = {
        k: value(after, k) - value(before, k)
        for k in (
            "persona_tokens_generated_total",
            "persona_time_to_first_token_seconds_count",
            "persona_inter_token_latency_seconds_count",
        )
    }
    # the engine may serve other apps' jobs too (shared in tests), so these are lower bounds
    assert grew["persona_tokens_generated_total"] >= n
    assert grew["persona_time_to_first_token_seconds_count"] >= 1
    assert grew["persona_inter_token_latency_seconds_count"] >= n - 1
    assert value(after, "persona_jobs_total", outcome="completed") >= 1
    assert value(after, "persona_queue_depth") == 0 and value(after, "persona_engine_up") == 1
    assert value(after, "persona_batch_size_max") >= 1 and value(after, "persona_decode_steps_total") >= n - 1


async def test_request_id_is_echoed_or_generated(client):
    given = await client.get("/health", headers={"X-Request-ID": "client-chosen.id-42"})
    fresh = await client.get("/health")
    hostile = await client.get("/health", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    error = await client.get("/api/v1/traits/nope", headers={"X-Request-ID": "err-1"})
    assert given.headers["x-request-id"] == "client-chosen.id-42"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])
    assert error.status_code == 404 and error.headers["x-request-id"] == "err-1"


async def test_access_log_is_one_json_line_with_the_request_id(client, caplog):
    with caplog.at_level(logging.INFO, logger="persona.access"):
        await client.get("/status", headers={"X-Request-ID": "trace-me-7"})
    records = [r for r in caplog.records if r.name == "persona.access"]
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == "trace-me-7" and line["message"] == "request"
    assert line["path"] == "/status" and line["status"] == 200 and line["method"] == "GET"
    assert line["duration_ms"] >= 0 and line["level"] == "INFO"


async def test_paged_kv_cache_in_metrics_and_status(client):
    metrics = samples((await client.get("/metrics")).text)
    assert value(metrics, "persona_kv_blocks_total") > 0 and value(metrics, "persona_kv_block_size") == 16
    assert 0 <= value(metrics, "persona_kv_blocks_used") <= value(metrics, "persona_kv_blocks_total")
    assert 0 <= value(metrics, "persona_prefix_cache_hit_rate") <= 1
    assert ("persona_kv_preemptions_total", ()) in metrics
    engine = (await client.get("/status")).json()["engine"]
    assert engine["decode_mode"] == "paged" and engine["kv_block_size"] == 16
    assert {"kv_blocks_total", "kv_blocks_used", "preemptions", "prefix_hit_rate"} <= set(engine)
