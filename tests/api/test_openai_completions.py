"""POST /v1/completions (echo + logprobs scoring, token prompts, n, streaming), steering presets as model names
on every route, chat logprobs, and lenient parsing, driven by the official `openai` client over a live server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from app.factory import create_app
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.storage.presets import load_presets
from tests.api.live_server import serve
from tests.infrastructure.test_prompt_scores import direct_scores

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEXT = "The capital of France is Paris, and the capital of Italy is Rome."


def _vector(seed: int, norm: float = 8.0) -> list[float]:
    v = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm() * norm).tolist()


V1, V2 = _vector(1), _vector(2)
STEER_1 = {"vectors": [{"vector": V1, "scale": 1.0, "layer": 10}]}
STEER_2 = {"vectors": [{"vector": V2, "scale": 1.0, "layer": 14}]}


@pytest.fixture(scope="module")
def rt(make_runtime, tmp_path_factory):
    """A runtime of its own (presets are per runtime), with its registry folder in a temporary directory."""
    return make_runtime(vectors_dir=tmp_path_factory.mktemp("vectors"))


@pytest.fixture(scope="module")
def base_url(rt):
    with serve(create_app(runtime=rt)) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)


def _score(oai, prompt, **kwargs):
    kwargs = {"model": MODEL, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0} | kwargs
    return oai.completions.create(prompt=prompt, **kwargs)


def test_echo_scores_every_prompt_token_as_a_direct_forward(oai, loaded_model):
    ids = loaded_model.tokenizer(TEXT)["input_ids"]
    answer = _score(oai, TEXT)
    (choice,) = answer.choices
    lp = choice.logprobs
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx(direct_scores(loaded_model.model, ids), abs=2e-4)
    assert "".join(lp.tokens) == TEXT and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 2 and max(top.values()) >= value - 1e-6


def test_token_prompts_n_choices_and_generation_as_the_engine(oai, loaded_model, engine):
    tok = loaded_model.tokenizer
    a, b = tok("The sky is")["input_ids"], tok("Two plus two is")["input_ids"]
    answer = oai.completions.create(model=MODEL, prompt=[a, b], n=2, max_tokens=4, temperature=0, logprobs=1)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text == answer.choices[1].text  # greedy: every choice of a prompt agrees
    rows = [RowRequest(tuple(p), SamplingParams(max_new_tokens=4)) for p in (a, b)]
    expected = {d.row: d for d in asyncio.run(engine.collect(GenerationJob(rows)))}
    assert answer.choices[0].text == expected[0].text and answer.choices[2].text == expected[1].text
    for c in answer.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) and all(
            v <= 0 for v in c.logprobs.token_logprobs
        )
    sampled = oai.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=6, temperature=1.0, seed=7)
    again = oai.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=6, temperature=1.0, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]


def test_streaming_equals_the_answer(oai):
    kwargs = {"model": MODEL, "prompt": TEXT[:30], "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1}
    whole = oai.completions.create(**kwargs).choices[0]
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    parts = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in parts) == whole.text
    assert [v for p in parts if p.logprobs for v in p.logprobs.token_logprobs] == whole.logprobs.token_logprobs
    assert [t for p in parts if p.logprobs for t in p.logprobs.text_offset] == whole.logprobs.text_offset
    assert parts[-1].finish_reason == whole.finish_reason and chunks[-1].usage.completion_tokens == 6


def _post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=600)


def test_presets_are_model_names_on_every_route(base_url, oai, rt, loaded_model):
    made = _post(base_url, "/api/v1/presets", {"name": "steered-a", "steering": STEER_1, "persist": True})
    assert made.status_code == 201 and made.json()["persisted"] is True
    assert [m.id for m in oai.models.list().data] == [MODEL, "steered-a"]
    assert oai.models.retrieve("steered-a").owned_by == "preset"
    plain = _score(oai, TEXT).choices[0].logprobs.token_logprobs[1:]
    preset = _score(oai, TEXT, model="steered-a").choices[0].logprobs.token_logprobs[1:]
    explicit = _score(oai, TEXT, extra_body={"steering": STEER_1}).choices[0].logprobs.token_logprobs[1:]
    assert preset == pytest.approx(explicit, abs=1e-5) and preset != pytest.approx(plain, abs=1e-2)
    both = {"vectors": STEER_1["vectors"] + STEER_2["vectors"]}
    added = _score(oai, TEXT, model="steered-a", extra_body={"steering": STEER_2}).choices[0].logprobs.token_logprobs
    assert added[1:] == pytest.approx(
        _score(oai, TEXT, extra_body={"steering": both}).choices[0].logprobs.token_logprobs[1:], abs=1e-5
    )
    chat = oai.chat.completions.create(
        model="steered-a", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8, temperature=0
    )
    assert chat.model == "steered-a"
    # Neuronpedia's route: `model` names the preset, whose vectors steer the STEERED rows
    np_vec = {"hook": "blocks.10.hook_resid_post", "strength": 1.0, "steering_vector": V1}
    body = {
        "prompt": "My favourite food is",
        "types": ["STEERED", "DEFAULT"],
        "n_completion_tokens": 8,
        "temperature": 0,
        "stream": False,
    }
    via_preset = _post(base_url, "/v1/steer/completion", body | {"model": "steered-a"}).json()["outputs"]
    via_vectors = _post(base_url, "/v1/steer/completion", body | {"vectors": [np_vec]}).json()["outputs"]
    assert via_preset == via_vectors and via_preset[0]["output"] != via_preset[1]["output"]
    # seed 002's generate: a `preset` field, equal to the OpenAI chat through the preset
    gen = _post(
        base_url, "/api/v1/generate", {"prompt": "Hi!", "preset": "steered-a", "max_tokens": 8, "temperature": 0}
    )
    assert gen.json()["text"] == chat.choices[0].message.content and gen.json()["preset"] == "steered-a"
    # persisted like registry vectors, then deleted with its file
    assert "steered-a" in load_presets(rt.settings.vectors_dir / "presets").presets
    assert httpx.get(f"{base_url}/api/v1/presets/steered-a", timeout=60).json()["steering"]["vectors"][0]["layer"] == 10
    gone = httpx.delete(f"{base_url}/api/v1/presets/steered-a", timeout=60).json()
    assert gone == {"name": "steered-a", "deleted": True, "file_removed": True}
    with pytest.raises(openai.NotFoundError) as err:
        _score(oai, TEXT, model="steered-a")
    assert err.value.body["param"] == "model"


def test_preset_errors_name_their_field(base_url):
    cases = [
        ({"name": MODEL.split("/")[-1], "steering": STEER_1}, 400, "name"),
        ({"name": "x", "steering": {"vectors": []}}, 400, "steering.vectors"),
        (
            {"name": "x", "steering": {"vectors": [{"vector": [1.0], "scale": 1, "layer": 3}]}},
            400,
            "steering.vectors.0.vector",
        ),
        ({"name": "bad/name", "steering": STEER_1}, 422, "name"),
    ]
    for body, status, param in cases:
        r = _post(base_url, "/api/v1/presets", body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.json()
    r = _post(base_url, "/api/v1/generate", {"prompt": "Hi", "preset": "nope"})
    assert (r.status_code, r.json()["error"]["param"]) == (404, "preset")


def test_chat_logprobs_stream_or_not(oai):
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    answer = oai.chat.completions.create(logprobs=True, top_logprobs=3, **kwargs)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the best one
    stream = oai.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kwargs)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # equal up to float noise (the second request reuses the first's cached prompt blocks)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert (
        oai.chat.completions.create(logprobs=True, top_logprobs=0, **kwargs).choices[0].logprobs.content[0].top_logprobs
        == []
    )


HARMLESS = {
    "parallel_tool_calls": False,
    "store": False,
    "metadata": {"run": "eval"},
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "safety_identifier": "s",
    "user": "u",
    "top_logprobs": 0,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "logit_bias": {},
    "tools": [],
    "modalities": ["text"],
}
NULLS = [
    "n",
    "stream",
    "stop",
    "seed",
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "max_tokens",
    "logprobs",
    "response_format",
    "steering",
    "stream_options",
    "model",
    "user",
    "metadata",
]


def test_harmless_fields_and_nulls_are_accepted(base_url):
    msgs = [{"role": "user", "content": "Hi"}]
    r = _post(base_url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2, **HARMLESS})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    r = _post(
        base_url,
        "/v1/chat/completions",
        {"messages": msgs, **dict.fromkeys(NULLS), "max_tokens": 2, "persona_monitoring": None},
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    legacy = {k: v for k, v in HARMLESS.items() if k not in ("top_logprobs", "tools", "modalities")}
    r = _post(
        base_url,
        "/v1/completions",
        {"prompt": "Hi", "max_tokens": 2, **legacy, **dict.fromkeys(["echo", "best_of", "suffix"])},
    )
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = _post(base_url, "/v1/completions", {"prompt": "Hi", **dict.fromkeys([k for k in NULLS if k != "max_tokens"])})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": ["a"] * 5}, 422, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": [1]}, 422, "stop"),
        ("/v1/completions", {"prompt": "Hi", "stop": ["a", 2]}, 422, "stop"),
        ("/v1/completions", {"prompt": [1, "a"]}, 422, "prompt"),
        ("/v1/completions", {"prompt": "Hi", "suffix": "!"}, 400, "suffix"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, 422, "logprobs"),
        ("/v1/completions", {"prompt": [999999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "Hi", "n": 2, "best_of": 3}, 400, "best_of"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]},
            400,
            "tools",
        ),
    ],
)
def test_refusals_name_their_param(base_url, path, body, status, param):
    r = _post(base_url, path, body)
    assert (r.status_code, r.json()["error"].get("param")) == (status, param), r.json()


def test_stop_strings_and_suffix_less_generation(oai):
    full = oai.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=12, temperature=0).choices[0]
    word = full.text.strip().split()[1]  # a word the greedy answer holds past its start
    cut = oai.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].text == full.text[: full.text.index(word)] and cut.choices[0].finish_reason == "stop"


def test_scoring_needs_the_paged_engine(base_url, engine, monkeypatch):
    monkeypatch.setattr(engine, "decode_mode", "dynamic")  # refused before any work reaches the engine
    r = _post(base_url, "/v1/completions", {"prompt": "Hi there", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "echo")
