"""The OpenAI-compatible surface driven by the official `openai` client over a real HTTP server."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from api.services.chat_common import assistant_spans
from app.factory import create_app
from infrastructure.persona.axis_data import PC_TITLE, AssistantAxis
from infrastructure.prompting import render_chat
from tests.api.live_server import serve

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_url(runtime):
    with serve(create_app(runtime=runtime)) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _vector(seed: int, norm: float = 60.0) -> list[float]:
    v = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm() * norm).tolist()


def _chat(oai, **kwargs):
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", QUESTION)
    kwargs.setdefault("max_tokens", 6)
    kwargs.setdefault("temperature", 0)
    return oai.chat.completions.create(**kwargs)


def _stream_text(oai, **kwargs) -> tuple[list[str], list]:
    chunks = list(_chat(oai, stream=True, **kwargs))
    n = kwargs.get("n", 1)
    texts = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(n)
    ]
    return texts, chunks


def test_models(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("gpt-4o")
    assert err.value.body["type"] == "model_not_found"


def test_greedy_answer_matches_seed_route(oai, base_url, runtime):
    answer = _chat(oai, max_tokens=12)
    [choice] = answer.choices
    assert answer.object == "chat.completion" and answer.model == MODEL and answer.id.startswith("chatcmpl-")
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    baseline = httpx.post(
        f"{base_url}/api/v1/generate/baseline",
        json={"prompt": QUESTION[0]["content"], "temperature": 0, "max_tokens": 12},
        timeout=120,
    ).json()
    assert choice.message.content == baseline["text"]
    prompt_len = len(render_chat(runtime.engine.tokenizer, QUESTION).ids)
    assert answer.usage.prompt_tokens == prompt_len == baseline["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == baseline["usage"]["completion_tokens"]
    assert answer.usage.total_tokens == prompt_len + answer.usage.completion_tokens


def test_stream_equals_answer_and_reports_usage(oai):
    answer = _chat(oai, max_tokens=12, max_completion_tokens=5)
    [text], chunks = _stream_text(oai, max_tokens=12, max_completion_tokens=5, stream_options={"include_usage": True})
    assert text == answer.choices[0].message.content and answer.usage.completion_tokens == 5
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_n_choices_with_seed_are_reproducible_rows(oai):
    kwargs = {"n": 2, "seed": 7, "temperature": 1.0, "top_p": 1.0, "max_tokens": 6}
    first = [c.message.content for c in _chat(oai, **kwargs).choices]
    again = [c.message.content for c in _chat(oai, **kwargs).choices]
    assert first == again and first[0] != first[1]
    # choice i samples with seed + i: each equals a one-choice request with that seed
    alone = _chat(oai, **{**kwargs, "n": 1, "seed": 8}).choices[0].message.content
    assert alone == first[1]
    streamed, _ = _stream_text(oai, **kwargs)
    assert streamed == first


def test_stop_strings_cut_the_text_streamed_or_not(oai):
    full = _chat(oai, max_tokens=8).choices[0].message.content
    word = full.split()[3]
    cut = _chat(oai, max_tokens=8, stop=[word, "zzzz"]).choices[0]
    assert cut.message.content == full[: full.index(word)] and cut.finish_reason == "stop"
    [streamed], _ = _stream_text(oai, max_tokens=8, stop=word)
    assert streamed == cut.message.content


def test_frequency_and_presence_penalties_change_a_repetitive_answer(oai):
    messages = [{"role": "user", "content": "Write the word 'cat' ten times."}]
    plain = _chat(oai, messages=messages, max_tokens=12).choices[0].message.content
    assert plain.lower().count("cat") >= 3
    for penalty in ("frequency_penalty", "presence_penalty"):
        penalised = _chat(oai, messages=messages, max_tokens=12, **{penalty: 2.0}).choices[0].message.content
        assert penalised != plain and penalised.lower().count("cat") < plain.lower().count("cat")


def test_steering_via_extra_body(oai, base_url):
    plain = _chat(oai).choices[0].message.content
    vec = _vector(3)

    def steered(scale: float, **where) -> str:
        spec = {"steering": {"vectors": [{"vector": vec, "scale": scale, **where}], "method": "add"}}
        return _chat(oai, extra_body=spec).choices[0].message.content

    assert steered(0.0, layer=10) == plain
    pushed = steered(1.0, layer=10)
    assert pushed != plain
    assert steered(1.0, hook="blocks.10.hook_resid_post") == pushed == steered(1.0, hook="blocks.11.hook_resid_pre")
    r = httpx.post(f"{base_url}/api/v1/vectors", json={"name": "oai-test", "layer": 10, "vector": vec}, timeout=60)
    assert r.status_code == 201, r.text
    try:
        by_name = {"steering": {"vectors": [{"trait": "oai-test", "scale": 1.0}]}}
        assert _chat(oai, extra_body=by_name).choices[0].message.content == pushed
    finally:
        httpx.delete(f"{base_url}/api/v1/vectors/oai-test", timeout=60)


def test_steering_positions_choose_prompt_or_response_tokens(oai):
    """`positions`: the first answer token comes from the prompt's last position, so it is steered with
    `prompt` (as with `all`) and not with `response` (as unsteered); later tokens the other way round."""
    vec = _vector(3)

    def steered(positions: str | None, max_tokens: int) -> str:
        where = {} if positions is None else {"positions": positions}
        spec = {"steering": {"vectors": [{"vector": vec, "scale": 1.0, "layer": 10}], **where}}
        return _chat(oai, max_tokens=max_tokens, extra_body=spec).choices[0].message.content

    plain1, plain6 = _chat(oai, max_tokens=1).choices[0].message.content, _chat(oai).choices[0].message.content
    all1, all6 = steered(None, 1), steered(None, 6)
    assert steered("all", 6) == all6 != plain6
    assert steered("prompt", 1) == all1
    assert steered("response", 1) == plain1
    assert steered("response", 6) != plain6 and steered("prompt", 6) != all6


def test_steering_errors_name_the_field(oai):
    with pytest.raises(openai.BadRequestError) as err:
        _chat(oai, extra_body={"steering": {"vectors": [{"vector": _vector(1), "scale": 1, "layer": 99}]}})
    assert err.value.body["param"] == "steering.vectors.0.layer" and err.value.body["type"] == "hook_out_of_range"
    with pytest.raises(openai.BadRequestError) as err:
        _chat(oai, extra_body={"steering": {"vectors": [{"vector": [1.0, 2.0], "scale": 1, "layer": 3}]}})
    assert err.value.body["param"] == "steering.vectors.0.vector"
    with pytest.raises(openai.NotFoundError) as err:
        _chat(oai, extra_body={"steering": {"vectors": [{"trait": "no-such-trait", "scale": 1}]}})
    assert err.value.body["param"] == "steering.vectors.0.trait"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
    ],
)
def test_unsupported_openai_fields_are_refused(oai, kwargs, field):
    with pytest.raises(openai.BadRequestError) as err:
        _chat(oai, **kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == field
    assert "not supported" in err.value.body["message"]


def test_unknown_fields_and_models_are_refused(oai):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        _chat(oai, extra_body={"temprature": 0.5})
    assert err.value.body["param"] == "temprature"
    with pytest.raises(openai.NotFoundError) as err:
        _chat(oai, model="gpt-4o")
    assert err.value.body["type"] == "model_not_found" and err.value.body["param"] == "model"
    assert _chat(oai, model=MODEL, response_format={"type": "text"}, logprobs=False).choices[0].message.content


def test_content_parts_and_developer_role(oai):
    plain = _chat(oai, messages=[{"role": "system", "content": "Be brief."}, *QUESTION]).choices[0].message.content
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]},
    ]
    assert _chat(oai, messages=parts).choices[0].message.content == plain


def test_persona_monitoring_without_axis_says_why(oai, runtime, monkeypatch):
    monkeypatch.setattr(runtime, "axis", None)
    monkeypatch.setattr(runtime, "axis_problem", "no assistant-axis data in data/persona/x")
    answer = _chat(oai, extra_body={"persona_monitoring": True}).model_extra
    assert answer["assistant_axis"] == [] and answer["assistant_axis_unavailable"].startswith("no assistant-axis")
    assert "assistant_axis" not in _chat(oai).model_extra


def _expected_turn_value(runtime, axis: AssistantAxis, ids: tuple[int, ...], span: tuple[int, int]) -> float:
    """The same value computed independently: one plain forward, hidden_states[L+1] = output of layer L."""
    model = runtime.loaded.model
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[axis.layer + 1][0, span[0] : span[1]].float()
    return float((h @ axis.direction).mean()) - axis.offset


def test_persona_monitoring_values(oai, runtime, monkeypatch):
    direction = torch.randn(576, generator=torch.Generator().manual_seed(11))
    axis = AssistantAxis(MODEL, 15, direction / direction.norm(), torch.full((576,), 0.01))
    monkeypatch.setattr(runtime, "axis", axis)
    messages = [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    answer = _chat(oai, messages=messages, n=2, temperature=0.9, seed=3, extra_body={"persona_monitoring": True})
    entries = answer.model_extra["assistant_axis"]
    assert [e["index"] for e in entries] == [0, 1] and {e["type"] for e in entries} == {"completion"}
    assert all(e["pc_titles"] == [PC_TITLE] and len(e["turns"]) == 2 for e in entries)
    prompt = render_chat(runtime.engine.tokenizer, messages)
    [span] = assistant_spans(messages, prompt)
    expected = _expected_turn_value(runtime, axis, prompt.ids, span)
    for entry, choice in zip(entries, answer.choices):
        prior, new = entry["turns"]
        assert prior["snippet"] == "Paris." and prior["pc_values"][PC_TITLE] == pytest.approx(expected, abs=1e-3)
        assert new["snippet"] == choice.message.content.strip() and isinstance(new["pc_values"][PC_TITLE], float)
    assert entries[0]["turns"][1] != entries[1]["turns"][1]
    # streamed: the chunk finishing the last choice carries the same summary
    _, chunks = _stream_text(
        oai, messages=messages, n=2, temperature=0.9, seed=3, extra_body={"persona_monitoring": True}
    )
    [last] = [c for c in chunks if (c.model_extra or {}).get("assistant_axis")]
    assert last is chunks[-1] and last.choices[0].finish_reason is not None
    assert last.model_extra["assistant_axis"] == entries
