"""Shared-secret auth: every route but /health needs X-SECRET-KEY or Authorization: Bearer."""

from __future__ import annotations

import pytest

from tests.app.support import GREEDY_PROBE, assert_error_shape, client_for

SECRET = "s3cret-for-tests"
PROTECTED = [
    ("GET", "/status", None),
    ("GET", "/api/v1/traits", None),
    ("GET", "/api/v1/traits/anything", None),
    ("POST", "/api/v1/generate/baseline", GREEDY_PROBE),
    ("POST", "/api/v1/generate", {**GREEDY_PROBE, "trait": "x", "scalar": 1.0}),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/no/such/route", None),
]


@pytest.fixture(scope="module")
def secret_app(make_app):
    return make_app(SECRET=SECRET)


@pytest.mark.parametrize("method,path,body", PROTECTED)
async def test_every_route_but_health_needs_the_secret(secret_app, method, path, body):
    async with client_for(secret_app) as c:
        missing = await c.request(method, path, json=body)
        wrong = await c.request(method, path, json=body, headers={"X-SECRET-KEY": SECRET + "x"})
        wrong_bearer = await c.request(method, path, json=body, headers={"Authorization": f"Basic {SECRET}"})
    for response in (missing, wrong, wrong_bearer):
        error = assert_error_shape(response, 401, "unauthorized")
        assert "X-SECRET-KEY" in error["message"]
        assert response.headers["www-authenticate"] == "Bearer"


async def test_health_is_open(secret_app):
    async with client_for(secret_app) as c:
        response = await c.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_both_headers_work_and_give_the_same_answer(secret_app, client):
    async with client_for(secret_app) as c:
        by_key = await c.post("/api/v1/generate/baseline", json=GREEDY_PROBE, headers={"X-SECRET-KEY": SECRET})
        by_bearer = await c.post(
            "/api/v1/generate/baseline", json=GREEDY_PROBE, headers={"Authorization": f"Bearer {SECRET}"}
        )
        status = await c.get("/status", headers={"authorization": f"bearer {SECRET}"})
    open_app = await client.post("/api/v1/generate/baseline", json=GREEDY_PROBE)
    assert by_key.status_code == by_bearer.status_code == 200
    assert by_key.json()["text"] == by_bearer.json()["text"] == open_app.json()["text"]
    assert by_key.json()["text"]
    assert status.status_code == 200 and status.json()["status"] == "ok"


async def test_api_key_alias_and_no_secret_means_open(make_app, client):
    app = make_app(API_KEY="alias-key")
    async with client_for(app) as c:
        denied = await c.get("/status")
        allowed = await c.get("/status", headers={"X-SECRET-KEY": "alias-key"})
    assert_error_shape(denied, 401, "unauthorized")
    assert allowed.status_code == 200
    assert (await client.get("/status")).status_code == 200  # the session app has no secret
