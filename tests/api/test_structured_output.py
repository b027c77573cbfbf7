"""`response_format` json_object / json_schema enforced while sampling: the `openai` client's parse helper and
LangChain's `with_structured_output` get parsed objects, through a steering preset too; bad schemas name
their field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from app.factory import create_app
from tests.api.live_server import serve

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Give me a city and its country as JSON."}]


class City(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def base_url(make_runtime, tmp_path_factory):
    with serve(create_app(runtime=make_runtime(vectors_dir=tmp_path_factory.mktemp("vectors")))) as url:
        # a vector of its own: the same steering and system-prompt tokens would share prefix-cache blocks with
        # other tests on the session engine (legitimately), changing their hit counts
        v = torch.randn(576, generator=torch.Generator().manual_seed(55))
        steer = {"vectors": [{"vector": (v / v.norm() * 8).tolist(), "scale": 1.0, "layer": 11}]}
        assert (
            httpx.post(
                f"{url}/api/v1/presets", json={"name": "json-steered", "steering": steer}, timeout=60
            ).status_code
            == 201
        )
        yield url


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.mark.parametrize("model", [MODEL, "json-steered"])
def test_openai_parse_helper_returns_the_object(oai, model):
    answer = oai.chat.completions.parse(model=model, messages=ASK, response_format=City, max_tokens=60, temperature=0)
    choice = answer.choices[0]
    assert isinstance(choice.message.parsed, City) and choice.finish_reason == "stop"
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_mode_sampled_rows(oai):
    answer = oai.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, n=2, max_tokens=40, temperature=1.0, seed=3
    )
    for choice in answer.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut by max_tokens: still a prefix the grammar allowed
            assert choice.message.content.lstrip().startswith("{")


def test_langchain_with_structured_output(base_url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{base_url}/v1",
        api_key="unused",
        temperature=0,
        max_tokens=60,
        max_retries=0,
        timeout=600,
    )
    city = llm.with_structured_output(City).invoke("Give me a city and its country as JSON.")
    assert isinstance(city, City)


def test_completions_route_takes_response_format_too(oai):
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "yes_no", "schema": schema}}
    text = oai.completions.create(
        model=MODEL,
        prompt="Is water wet? Reply in JSON.",
        max_tokens=20,
        temperature=0,
        extra_body={"response_format": fmt},
    )
    assert isinstance(json.loads(text.choices[0].text)["answer"], bool)


@pytest.mark.parametrize(
    "fmt, param",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format"),
        ({"type": "grammar"}, "response_format.type"),
    ],
)
def test_bad_formats_name_their_field(base_url, fmt, param):
    body = {"messages": ASK, "response_format": fmt, "max_tokens": 4}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=600)
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, r.json()
