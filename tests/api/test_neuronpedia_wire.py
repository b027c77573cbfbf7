"""Neuronpedia's wire without a model: both casings in, the caller's casing out, flat errors, Accept."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.schemas.completion_chat import CompletionChatRequest
from api.services.neuronpedia_wire import camelize, error_frame, flat_error
from api.services.steer_common import source_hook, wants_stream
from infrastructure.errors import InvalidRequestError

SNAKE_FRAME = {
    "outputs": [
        {
            "type": "STEERED",
            "raw": "<t>hi",
            "chat_template": [{"role": "user", "content": "x"}],
            "logprobs": [{"token": "hi", "logprob": -0.5, "top_logprobs": [{"token": "hi", "logprob": -0.5}]}],
        }
    ],
    "input": {"raw": "<t>", "chat_template": [{"role": "user", "content": "x"}]},
    "assistant_axis": [
        {"type": "STEERED", "pc_titles": ["pc_1"], "turns": [{"pc_values": {"snake_title": 1.0}, "snippet": "hi"}]}
    ],
}


def test_camelize_renames_fields_and_leaves_data_alone():
    camel = camelize(SNAKE_FRAME)
    assert camel["outputs"][0]["chatTemplate"] == SNAKE_FRAME["outputs"][0]["chat_template"]
    assert camel["outputs"][0]["logprobs"][0]["topLogprobs"][0] == {"token": "hi", "logprob": -0.5}
    assert camel["input"]["chatTemplate"] and "chat_template" not in str(camel)
    turn = camel["assistantAxis"][0]["turns"][0]
    assert camel["assistantAxis"][0]["pcTitles"] == ["pc_1"] and turn["pcValues"] == {"snake_title": 1.0}


def test_casing_round_trip_through_the_request_model():
    """A camelCase body reads the same as its snake_case twin, and the casing is remembered."""
    snake = {
        "prompt": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "types": ["STEERED"],
        "vectors": [{"hook": "blocks.3.hook_resid_post", "strength": 2.0, "steering_vector": [0.5] * 576}],
        "strength_multiplier": 1.5,
        "n_completion_tokens": 7,
        "freq_penalty": 0.25,
        "steer_method": "ORTHOGONAL_DECOMP",
        "normalize_steering": True,
        "steer_special_tokens": True,
        "n_logprobs": 3,
        "is_assistant_axis": False,
        "seed": 12.0,
    }
    camel = camelize_request(snake)
    a, b = CompletionChatRequest.model_validate(snake), CompletionChatRequest.model_validate(camel)
    assert a.model_dump() == b.model_dump()
    assert (a.camel, b.camel) == (False, True)
    assert b.n_completion_tokens == 7 and b.vectors[0].steering_vector == [0.5] * 576 and b.int_seed == 12


def camelize_request(body: dict) -> dict:
    from pydantic.alias_generators import to_camel

    out = {to_camel(k): v for k, v in body.items()}
    out["vectors"] = [{to_camel(k): v for k, v in vec.items()} for vec in body["vectors"]]
    return out


def test_previous_generation_sends_both_vector_keys():
    vec = {"hook": "blocks.3.hook_resid_post", "strength": 1.0, "steering_vector": [1.0], "steeringVector": [1.0]}
    body = CompletionChatRequest.model_validate({"prompt": [{"role": "user", "content": "x"}], "vectors": [vec]})
    assert body.vectors[0].steering_vector == [1.0] and body.camel is False
    vec["steeringVector"] = [2.0]
    with pytest.raises(ValidationError, match="same field"):
        CompletionChatRequest.model_validate({"prompt": [{"role": "user", "content": "x"}], "vectors": [vec]})


def test_float_and_negative_seeds():
    def seed_of(value):
        return CompletionChatRequest.model_validate({"prompt": [{"role": "user", "content": "x"}], "seed": value})

    assert seed_of(42.9).int_seed == 42 and seed_of(-1).int_seed == 2**63 - 1 and seed_of(None).int_seed is None


def test_flat_error_and_mid_stream_error_frame_keep_outputs():
    assert flat_error("t", "m") == {"error": "m", "type": "t"}
    frame = error_frame(SNAKE_FRAME, "timeout", "too slow", "x")
    assert frame["outputs"] == SNAKE_FRAME["outputs"] and frame["input"] == SNAKE_FRAME["input"]
    assert (frame["error"], frame["type"], frame["param"]) == ("too slow", "timeout", "x")
    assert "assistant_axis" not in frame


@pytest.mark.parametrize(
    ("stream", "accept", "expected"),
    [
        (True, "application/json", True),
        (False, "text/event-stream", False),
        (None, None, True),
        (None, "*/*", True),
        (None, "text/event-stream", True),
        (None, "application/json", False),
        (None, "application/json, text/plain, */*", False),
        (None, "text/event-stream, application/json", True),
    ],
)
def test_stream_follows_the_field_then_the_accept_header(stream, accept, expected):
    assert wants_stream(stream, accept) is expected


@pytest.mark.parametrize(
    ("source", "hook"),
    [
        ("20-res-jb", "blocks.20.hook_resid_pre"),
        ("20-gemmascope-res-16k", "blocks.20.hook_resid_post"),
        ("3-llamascope-res-32k", "blocks.3.hook_resid_post"),
    ],
)
def test_sae_source_names_its_residual_hook(source, hook):
    assert source_hook(source, "features.0.source") == hook


@pytest.mark.parametrize("source", ["res-jb", "20-att-kk", "5-res_mid_32k-oai"])
def test_non_residual_sources_are_refused(source):
    with pytest.raises(InvalidRequestError):
        source_hook(source, "features.0.source")
