"""FastJSONRequest: pydantic-core's parser on the fast path, the standard library for everything it refuses."""

from __future__ import annotations

import json
import math

import pytest

from api.routing import FastJSONRequest


def request_with(body: bytes) -> FastJSONRequest:
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"application/json")]}
    return FastJSONRequest(scope, receive)


async def test_a_vector_body_parses_to_exactly_what_json_loads_gives():
    values = [math.pi * (i - 1792) / 7 for i in range(3584)] + [1e-300, -0.0, 12345678901234567890]
    body = json.dumps({"vectors": [{"steering_vector": values}], "prompt": "héllo 🚀"}).encode()
    parsed = await request_with(body).json()
    assert parsed == json.loads(body)
    assert [v.hex() if isinstance(v, float) else v for v in parsed["vectors"][0]["steering_vector"]] == [
        v.hex() if isinstance(v, float) else v for v in values
    ]


async def test_non_finite_literals_parse_for_the_schema_to_refuse():
    parsed = await request_with(b'{"a": NaN, "b": Infinity, "c": -Infinity}').json()
    assert math.isnan(parsed["a"]) and parsed["b"] == math.inf and parsed["c"] == -math.inf


async def test_deep_or_malformed_bodies_fall_back_to_the_standard_library():
    deep = b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}"
    assert (await request_with(deep).json()) == json.loads(deep)  # deeper than pydantic-core's 255 levels
    with pytest.raises(json.JSONDecodeError):
        await request_with(b'{"prompt": ').json()
