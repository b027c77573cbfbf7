"""Schemathesis against the app's own /openapi.json, in-process: no 5xx, and every 4xx in the one
error shape. Bounded: few examples, at most 4 new tokens and 64 prompt tokens per request."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.helpers import error_of

EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 40}
ONE_SHAPE_KEYS = {"type", "message", "param"}


def check_response(case, response) -> None:
    """The invariants every answer must satisfy, whatever the input."""
    where = f"{case.method} {case.path} body={str(case.body)[:300]!r}"
    assert response.status_code < 500, f"{response.status_code} for {where}: {response.text[:300]}"
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: header -> list
    if response.status_code >= 400:
        error = error_of(case.path, response.json())  # flat on Neuronpedia's routes, nested elsewhere
        assert set(error) <= ONE_SHAPE_KEYS and error["type"] and error["message"], f"{where}: {error}"
    elif content_type.startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                frame = json.loads(line[6:])
                kind = frame.get("type") if isinstance(frame.get("error"), str) else frame.get("error", {}).get("type")
                assert kind not in ("internal_error", "generation_error"), frame


@pytest.fixture(scope="module")
def fuzz_schema(make_app):
    app = make_app(max_new_tokens_limit=4, token_limit=64, max_tokens=4)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", list(EXAMPLES))
def test_openapi_fuzz_no_5xx_and_one_error_shape(fuzz_schema, engine, mode):
    tried: list[str] = []

    @given(case=fuzz_schema.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        tried.append(f"{case.method} {case.path}")
        check_response(case, case.call())

    run()
    print(f"\nschemathesis {mode.value}: {len(tried)} cases over {len(set(tried))} operations")
    assert len(tried) >= EXAMPLES[mode] // 2
    assert engine.broken is None and engine.active_requests == 0
