"""The served OpenAPI schema, with request examples that the loaded model accepts as they are.

Every example in /openapi.json is meant to succeed when sent unchanged (tests/api/test_openapi_examples.py
sends them all). Most are fixed values; the registry's JSON example and Neuronpedia's raw `steering_vector`
examples carry vectors, which must have the loaded model's hidden size, so the schema is rebuilt with it
once the model is loaded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from api.schemas.vectors import json_example

REGISTRY_BODY = ("/api/v1/vectors", "post", "application/json")


def _fill_registry_example(schema: dict[str, Any], hidden_size: int) -> None:
    path, method, media = REGISTRY_BODY
    content = schema["paths"][path][method]["requestBody"]["content"][media]
    content["example"] = json_example(hidden_size)


def _sized_vectors(value: Any, hidden_size: int) -> Any:
    """`value` with every example `steering_vector` (a list of floats) stretched to the model's hidden size."""
    if isinstance(value, dict):
        return {
            k: [v[0]] * hidden_size
            if k == "steering_vector" and isinstance(v, list) and v
            else _sized_vectors(v, hidden_size)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_sized_vectors(v, hidden_size) for v in value]
    return value


def _fill_vector_examples(schema: dict[str, Any], hidden_size: int) -> None:
    """Request-body examples that steer with raw floats (Neuronpedia's routes) get vectors of the served size."""
    for component in schema.get("components", {}).get("schemas", {}).values():
        if "examples" in component:
            component["examples"] = _sized_vectors(component["examples"], hidden_size)


def install_openapi(app: FastAPI, hidden_size: Callable[[], int | None]) -> None:
    """Replace app.openapi: FastAPI's schema (cached), with the registry example sized for the served
    model; rebuilt when the hidden size changes (None while the model loads: the embedded model's)."""
    build = app.openapi
    built_for: list[int | None] = []

    def openapi() -> dict[str, Any]:
        size = hidden_size()
        if app.openapi_schema is None or built_for != [size]:
            app.openapi_schema = None
            schema = build()
            if size is not None:
                _fill_registry_example(schema, size)
                _fill_vector_examples(schema, size)
            built_for[:] = [size]
        return app.openapi_schema

    app.openapi = openapi
