"""Issue 20 at the app level: auth settings, registry writes, uploads bounded and parsed off the loop,
prompt limits before tokenising, and non-streaming requests cancelled when their client leaves."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import struct
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import save

from app.auth import describe_auth
from app.settings import Settings
from tests.app.support import GREEDY_PROBE, assert_error_shape, client_for, settles

BASELINE = "/api/v1/generate/baseline"
VEC = (torch.arange(576, dtype=torch.float32) / 576).tolist()


def test_blank_secret_does_not_disable_the_api_key(monkeypatch):
    monkeypatch.setenv("SECRET", "")
    monkeypatch.setenv("API_KEY", "key-1")
    assert Settings(_env_file=None).secret == "key-1"
    monkeypatch.setenv("SECRET", "  s3cret \n")
    assert Settings(_env_file=None).secret == "s3cret"  # a stray newline does not lock everyone out
    monkeypatch.setenv("SECRET", "   ")
    monkeypatch.delenv("API_KEY")
    assert Settings(_env_file=None).secret is None


def test_start_up_says_whether_auth_is_on(make_app, caplog):
    assert describe_auth(None, None).startswith("auth OFF")
    assert "registry writes: ADMIN_SECRET" in describe_auth("s", "a")
    assert "registry writes: SECRET holders" in describe_auth("s", None)
    from fastapi.testclient import TestClient

    with caplog.at_level(logging.INFO, logger="app.factory"), TestClient(make_app(SECRET="k")):
        pass
    assert any("auth on" in r.getMessage() for r in caplog.records)


async def test_whitespace_secret_still_lets_its_holder_in(make_app):
    async with client_for(make_app(SECRET="k1\n")) as c:
        assert (await c.get("/status", headers={"X-SECRET-KEY": "k1"})).status_code == 200
        assert (await c.get("/status")).status_code == 401


async def test_admin_secret_guards_registry_writes_only(make_app):
    async with client_for(make_app(SECRET="user", ADMIN_SECRET="admin")) as c:
        body = {"name": "adm-probe", "layer": 3, "vector": VEC}
        user = {"X-SECRET-KEY": "user"}
        refused = await c.post("/api/v1/vectors", json=body, headers=user)
        assert "ADMIN_SECRET" in assert_error_shape(refused, 401, "unauthorized")["message"]
        created = await c.post("/api/v1/vectors", json=body, headers={"Authorization": "Bearer admin"})
        assert created.status_code == 201, created.text
        assert (await c.get("/api/v1/vectors/adm-probe", headers=user)).status_code == 200  # reads: SECRET
        assert (await c.delete("/api/v1/vectors/adm-probe", headers=user)).status_code == 401
        assert (await c.delete("/api/v1/vectors/adm-probe", headers={"X-SECRET-KEY": "admin"})).status_code == 200


async def test_registry_limits(make_app):
    app = make_app(registry_max_vectors=1, registry_max_file_bytes=4096, max_steering_value=10.0)
    async with client_for(app) as c:
        huge = await c.post("/api/v1/vectors", json={"name": "huge", "layer": 3, "vector": [1e38] * 576})
        assert "MAX_STEERING_VALUE" in assert_error_shape(huge, 400)["message"]
        first = await c.post("/api/v1/vectors", json={"name": "lim-1", "layer": 3, "vector": VEC})
        assert first.status_code == 201
        full = await c.post("/api/v1/vectors", json={"name": "lim-2", "layer": 3, "vector": VEC})
        assert assert_error_shape(full, 409, "registry_full")["param"] == "name"
        big = save({"3": torch.zeros(576), "4": torch.zeros(576)})  # 4.6 kB > 4096
        files = {"file": ("cv.safetensors", io.BytesIO(big))}
        too_big = await c.post("/api/v1/vectors", data={"name": "lim-3", "overwrite": "true"}, files=files)
        assert "REGISTRY_MAX_FILE_BYTES" in assert_error_shape(too_big, 400)["message"]
        assert (await c.delete("/api/v1/vectors/lim-1")).status_code == 200


@pytest.mark.parametrize(
    "tensors, words",
    [
        ({"3": torch.ones(576, dtype=torch.bool)}, "bool; expected floats"),
        ({"3": torch.ones(576, dtype=torch.int64)}, "int64; expected floats"),
        ({"1" + "0" * 4999: torch.ones(576)}, "does not name a layer"),
        ({"03": torch.ones(576)}, "does not name a layer"),
    ],
)
async def test_uploads_refuse_non_float_and_oddly_named_tensors(client, tensors, words):
    files = {"file": ("cv.safetensors", io.BytesIO(save(tensors)))}
    r = await client.post("/api/v1/vectors", data={"name": "odd-upload"}, files=files)
    error = assert_error_shape(r, 400)
    assert error["param"] == "file" and words in error["message"], error


async def test_gguf_bomb_is_refused_at_once_and_uploads_parse_off_the_loop(client, monkeypatch):
    bomb = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 0, 10**6)
    bomb += b"\0" * (2400 - len(bomb))
    start = time.perf_counter()
    r = await client.post("/api/v1/vectors", data={"name": "bomb"}, files={"file": ("x.gguf", io.BytesIO(bomb))})
    assert time.perf_counter() - start < 2.0
    assert "unreadable GGUF" in assert_error_shape(r, 400)["message"]
    import api.routes.vectors as route

    threads = []
    real = route.parse_upload

    def spy(runtime, data):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(runtime, data)

    monkeypatch.setattr(route, "parse_upload", spy)
    files = {"file": ("cv.safetensors", io.BytesIO(save({"3": torch.tensor(VEC)})))}
    ok = await client.post("/api/v1/vectors", data={"name": "off-loop"}, files=files)
    assert ok.status_code == 201 and threads == [False]
    assert (await client.delete("/api/v1/vectors/off-loop")).status_code == 200


async def test_prompt_limits_are_checked_on_characters_first_and_name_the_context(make_app, client, monkeypatch):
    import api.services.checks as checks

    calls = []
    real = checks.render_chat

    def spy(*args, **kwargs):
        calls.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(checks, "render_chat", spy)
    async with client_for(make_app(token_limit=40)) as c:
        huge = await c.post(BASELINE, json={"prompt": "x" * 200_000, "max_tokens": 2})
    error = assert_error_shape(huge, 400, "token_limit")
    assert "characters" in error["message"] and error["param"] == "prompt"
    assert calls == []  # refused before tokenising
    served = await client.post(BASELINE, json=GREEDY_PROBE)
    assert served.status_code == 200 and calls == [False]  # tokenised on a worker thread
    too_long = await client.post(BASELINE, json={"prompt": "word " * 9000, "max_tokens": 2})
    error = assert_error_shape(too_long, 400, "token_limit")
    assert "context is 8192" in error["message"] and "65536" not in error["message"]


async def test_status_reveals_no_file_paths(client, runtime, make_app, tmp_path):
    async with client_for(make_app(persona_data_path=tmp_path / "persona")) as c:
        detail = (await c.get("/status")).json()["persona_monitoring_detail"]
    assert "PERSONA_DATA_PATH" in detail and str(tmp_path) not in detail
    status = (await client.get("/status")).json()
    for key in status["traits_skipped"]:
        assert not key.startswith("/"), key
    name = sorted(runtime.traits.traits)[0]
    detail = (await client.get(f"/api/v1/traits/{name}")).json()
    assert "/" not in detail["vector_file"]


async def test_a_json_request_whose_client_leaves_is_cancelled(app, engine):
    """A raw socket sends a non-streaming request and closes: the row leaves the batch long before its
    max_tokens (before the fix it decoded all of them for nobody)."""
    from tests.api.live_server import serve

    assert await settles(lambda: engine.active_requests == 0)
    body = b'{"prompt": "Tell me a very long story about a lighthouse keeper.", "max_tokens": 400, "temperature": 0}'
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        tokens = engine.stats["tokens"]
        sock = socket.create_connection((host, int(port)))
        head = f"POST {BASELINE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert await settles(lambda: engine.active_requests == 1, 20)
        await asyncio.sleep(0.3)
        sock.close()
        assert await settles(lambda: engine.active_requests == 0, 10)
    assert engine.stats["tokens"] - tokens < 200


async def test_forwarded_headers_are_ignored_unless_the_proxy_is_trusted(make_app):
    """Rate limits key on the peer address: X-Forwarded-For from an untrusted peer (even loopback) is ignored."""
    from app.serve import build_server
    from tests.api.live_server import serve

    app = make_app(rate_limit="2/minute")
    with serve(app, server=build_server(app.state.runtime.settings, app, log_level="warning")) as url:
        codes = [httpx.get(f"{url}/status", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
    assert codes == [200, 200, 429]
    trusted = make_app(rate_limit="2/minute", forwarded_allow_ips="127.0.0.1")
    with serve(trusted, server=build_server(trusted.state.runtime.settings, trusted, log_level="warning")) as url:
        codes = [httpx.get(f"{url}/status", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
    assert codes == [200, 200, 200]  # behind a configured proxy, each forwarded client has its own budget
