"""Neuronpedia's webapp against this server: request bodies built exactly as `apps/webapp/lib/utils/inference.ts`
builds them (current camelCase generation, and the previous snake_case one), answers read the way each
generation's parser reads them (`app/api/steer-chat/route.tsx`, `app/api/steer/route.tsx`)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.api.test_completion_chat import HOOK, sse_frames, unit_vector

CHAT = "/v1/steer/completion-chat"
COMPLETION = "/v1/steer/completion"
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
VECTOR = unit_vector(7)  # 576 floats, the embedded model's hidden size


def js(obj: dict) -> dict:
    """JSON.stringify drops `undefined` members: None here."""
    return {k: v for k, v in obj.items() if v is not None}


def steer_feature(strength: float = 48.0) -> dict:
    """A SteerFeature with a vector (`feature.neuron.vector`, `hookName`), as the webapp holds it."""
    return {"modelId": "smollm2-135m", "layer": "15-res", "index": 0, "strength": strength,
            "neuron": {"vector": VECTOR, "hookName": HOOK}}  # fmt: skip


def current_vectors(features: list[dict]) -> list[dict]:
    """convertSteerFeatureVectorsToInferenceVectors (current): `{hook, steeringVector, strength}`."""
    return [{"hook": f["neuron"]["hookName"] or "", "steeringVector": f["neuron"]["vector"], "strength": f["strength"]}
            for f in features if f["neuron"]["vector"]]  # fmt: skip


def previous_vectors(features: list[dict]) -> list[dict]:
    """convertSteerFeatureVectorsToInferenceVectors (previous): both keys for the floats."""
    return [{"hook": f["neuron"]["hookName"] or "", "steering_vector": f["neuron"]["vector"],
             "steeringVector": f["neuron"]["vector"], "strength": f["strength"]} for f in features]  # fmt: skip


def current_chat_body(steer_type: str, model: str, stream: bool, n_logprobs: int = 0, axis: bool = False) -> dict:
    """steerCompletionChat's per-type body (current webapp, hasVector = true)."""
    features = [steer_feature()]
    return js({
        "types": [steer_type], "prompt": MESSAGES, "model": model,
        "features": None, "vectors": current_vectors(features),
        "strengthMultiplier": 1, "nCompletionTokens": 8, "temperature": 0, "freqPenalty": 0, "seed": 16,
        "steerSpecialTokens": False, "steerMethod": "SIMPLE_ADDITIVE", "normalizeSteering": False,
        "stream": stream, "nLogprobs": n_logprobs, "isAssistantAxis": axis,
    })  # fmt: skip


def previous_chat_body(types: list[str], model: str, n_logprobs: int = 0) -> dict:
    """steerCompletionChat's combined body (previous webapp, one server, equal messages)."""
    features = [steer_feature()]
    return js({
        "types": types, "prompt": MESSAGES, "model": model,
        "features": None, "vectors": previous_vectors(features),
        "strength_multiplier": 1, "n_completion_tokens": 8, "temperature": 0, "freq_penalty": 0, "seed": 16,
        "steer_special_tokens": False, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False,
        "stream": True, "n_logprobs": n_logprobs, "is_assistant_axis": False,
    })  # fmt: skip


def current_chat_parser(frames: list[dict], steer_type: str) -> dict:
    """steer-chat/route.tsx generateResponse (current): `value.outputs.find(...)` (throws when absent),
    `output.raw`, `output.chatTemplate`, `output.logprobs`, `value.input`, `value.assistantAxis`."""
    result: dict = {}
    for value in frames:
        output = next(o for o in value["outputs"] if o["type"] == steer_type)  # StopIteration = their throw
        result = {"raw": output["raw"], "chatTemplate": output["chatTemplate"], "logprobs": output.get("logprobs"),
                  "input": value["input"], "assistantAxis": value.get("assistantAxis")}  # fmt: skip
    return result


def previous_chat_parser(frames: list[dict], steer_types: list[str]) -> dict:
    """SteerCompletionChatPost200ResponseFromJSON (generated client, previous webapp): snake_case on the wire."""
    result: dict = {}
    for value in frames:
        for steer_type in steer_types:
            output = next(o for o in value["outputs"] if o["type"] == steer_type)
            result[steer_type] = {"raw": output["raw"], "chatTemplate": output["chat_template"],
                                  "logprobs": output.get("logprobs")}  # fmt: skip
        result["input"] = {"raw": value["input"]["raw"], "chatTemplate": value["input"]["chat_template"]}
    return result


async def test_current_webapp_streams_one_request_per_type_and_parses_camel_case(client, runtime):
    model = runtime.loaded.model_id
    parsed = {}
    for steer_type in ("STEERED", "DEFAULT"):
        r = await client.post(CHAT, json=current_chat_body(steer_type, model, stream=True, axis=True))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        frames = sse_frames(r.text)
        assert all("chat_template" not in json.dumps(f) for f in frames)
        parsed[steer_type] = current_chat_parser(frames, steer_type)
    steered, default = parsed["STEERED"], parsed["DEFAULT"]
    assert steered["raw"] != default["raw"] and steered["input"]["chatTemplate"] == MESSAGES
    assert steered["chatTemplate"][:-1] == MESSAGES and steered["chatTemplate"][-1]["role"] == "assistant"
    assert steered["logprobs"] is None  # nLogprobs 0: the key is omitted, never null
    axis = steered["assistantAxis"]
    assert axis is not None and (axis == [] or {"type", "pcTitles", "turns"} <= set(axis[0]))


async def test_current_webapp_non_streaming_path_reads_one_json_answer(client, runtime):
    body = current_chat_body("DEFAULT", runtime.loaded.model_id, stream=False)
    r = await client.post(CHAT, json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    data = r.json()  # unwrapInferenceResponse: `data` is the body
    assert data["outputs"][0]["type"] == "DEFAULT" and data["outputs"][0]["chatTemplate"][-1]["content"]
    assert "assistantAxis" not in data  # isAssistantAxis false: omitted like Neuronpedia's exclude_none


async def test_previous_webapp_combined_request_parses_snake_case(client, runtime):
    body = previous_chat_body(["STEERED", "DEFAULT"], runtime.loaded.model_id)
    r = await client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    frames = sse_frames(r.text)
    parsed = previous_chat_parser(frames, ["STEERED", "DEFAULT"])
    assert parsed["STEERED"]["raw"] != parsed["DEFAULT"]["raw"]
    assert parsed["input"]["chatTemplate"] == MESSAGES and "chatTemplate" not in r.text


async def test_logprobs_match_the_greedy_tokens(client, runtime):
    body = current_chat_body("STEERED", runtime.loaded.model_id, stream=True, n_logprobs=3)
    frames = sse_frames((await client.post(CHAT, json=body)).text)
    last = current_chat_parser(frames, "STEERED")
    logprobs = last["logprobs"]
    reply = last["chatTemplate"][-1]["content"]
    assert len(logprobs) == 8  # one per generated token (nCompletionTokens, no early stop here)
    for entry in logprobs:
        top = entry["topLogprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"] and top[0]["logprob"] == entry["logprob"]
        assert entry["logprob"] <= 0 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
    assert "".join(e["token"] for e in logprobs) == reply
    growing = [len(current_chat_parser([f], "STEERED")["logprobs"] or []) for f in frames]
    assert growing == sorted(growing) and growing[-1] == 8  # cumulative, like the text


async def test_webapp_errors_are_read_from_the_error_string(client):
    """messageFromInferenceErrorBody: `typeof body.error === 'string'` is what the user sees."""
    r = await client.post(CHAT, json=current_chat_body("STEERED", "gemma-2-2b", stream=True))
    assert r.status_code == 404 and "gemma-2-2b" in r.json()["error"] and r.json()["param"] == "model"
    bad = current_chat_body("STEERED", "SmolLM2-135M-Instruct", stream=True)  # the served model's short id
    bad["vectors"][0]["hook"] = ""  # a neuron without hookName
    r = await client.post(CHAT, json=bad)
    assert r.status_code == 400 and isinstance(r.json()["error"], str) and r.json()["param"] == "vectors.0.hook"
    r = await client.post(CHAT, json={**bad, "nCompletionTokens": "many"})
    assert (
        r.status_code == 422 and r.json()["param"] == "n_completion_tokens" and r.json()["type"] == "validation_error"
    )


async def test_features_steer_with_their_vector_or_say_sae_weights_are_not_served(client, runtime):
    base = current_chat_body("STEERED", runtime.loaded.model_id, stream=False)
    as_vector = (await client.post(CHAT, json=base)).json()
    feature = {"model": "smollm2-135m", "source": "15-res-x", "index": 3, "strength": 48.0, "steeringVector": VECTOR}
    as_feature = (await client.post(CHAT, json={**base, "vectors": None, "features": [feature]})).json()
    assert as_feature["outputs"] == as_vector["outputs"]  # 15-res-x -> blocks.15.hook_resid_post
    without = {k: v for k, v in feature.items() if k != "steeringVector"}
    r = await client.post(CHAT, json={**base, "vectors": None, "features": [without]})
    assert r.status_code == 400 and "SAE weights are not served" in r.json()["error"]
    assert r.json()["param"] == "features.0.steering_vector"


async def test_stream_absent_follows_accept(client):
    body = {"prompt": MESSAGES, "types": ["DEFAULT"], "temperature": 0, "nCompletionTokens": 3}
    as_json = await client.post(CHAT, json=body, headers={"accept": "application/json"})
    as_sse = await client.post(CHAT, json=body, headers={"accept": "text/event-stream"})
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_sse.headers["content-type"].startswith("text/event-stream")
    assert sse_frames(as_sse.text)[-1]["outputs"] == as_json.json()["outputs"]


async def test_raw_completion_as_steerCompletion_sends_and_its_parser_reads(client, runtime):
    def body(stream: bool) -> dict:  # steerCompletion (current webapp, hasVector)
        return js({
            "types": ["STEERED", "DEFAULT"], "prompt": "The sea is", "model": runtime.loaded.model_id,
            "features": None, "vectors": current_vectors([steer_feature()]),
            "strengthMultiplier": 1, "nCompletionTokens": 6, "temperature": 0, "freqPenalty": 0, "seed": 4,
            "steerMethod": "SIMPLE_ADDITIVE", "normalizeSteering": False, "stream": stream, "nLogprobs": 2,
        })  # fmt: skip

    r = await client.post(COMPLETION, json=body(True))
    assert r.status_code == 200, r.text
    frames = sse_frames(r.text)
    # steer/route.tsx transformStream: outputs.map(o => ({type, output, logprobs}))
    parsed = [{o["type"]: (o["output"], o.get("logprobs")) for o in f["outputs"]} for f in frames]
    steered, default = parsed[-1]["STEERED"], parsed[-1]["DEFAULT"]
    assert steered[0] != default[0] and "The sea is" not in steered[0]  # the completion only
    assert len(default[1]) == 6 and "".join(e["token"] for e in default[1]) == default[0]
    final = await client.post(COMPLETION, json=body(False))
    assert final.json() == frames[-1]


async def test_orthogonal_decomp_scales_the_captured_component(runtime, engine):
    """ORTHOGONAL_DECOMP at layer 15 with c: at every steered prompt position the captured h.u (after the hook)
    is c times the unsteered one (earlier layers are untouched); c = 1 generates the DEFAULT text exactly."""
    from dataclasses import replace

    from api.schemas.completion_chat import CompletionChatRequest
    from api.services.completion_chat import prepare
    from infrastructure.engine.job import GenerationJob
    from infrastructure.steering.spec import Capture

    u = torch.tensor(VECTOR)

    def rows(strength: float) -> list:
        vector = {"hook": HOOK, "strength": strength, "steering_vector": [x * 3 for x in VECTOR]}
        payload = {"prompt": MESSAGES, "types": ["STEERED", "DEFAULT"], "temperature": 0, "n_completion_tokens": 6,
                   "steer_method": "ORTHOGONAL_DECOMP", "steer_special_tokens": True, "is_assistant_axis": False,
                   "vectors": [vector]}  # fmt: skip
        chat = prepare(runtime, CompletionChatRequest.model_validate(payload))
        return [replace(r, captures=(Capture("u", 15, u),)) for r in chat.rows]

    steered, default = await engine.collect(GenerationJob(rows(2.5)))
    n_prompt = len(rows(2.5)[0].prompt_ids)
    for s, d in zip(steered.captures["u"][:n_prompt], default.captures["u"][:n_prompt]):
        assert abs(s - 2.5 * d) < 1e-3 * max(1.0, abs(d))
    same, base = await engine.collect(GenerationJob(rows(1.0)))
    assert same.token_ids == base.token_ids and same.captures["u"] == base.captures["u"]


async def test_orthogonal_decomp_math_on_a_captured_activation(loaded_model):
    """The hook's ORTHO update on a real residual activation (layer 15 of the embedded model) equals
    h - (h.u)u + c(h.u)u computed independently in float64."""
    from infrastructure.steering.hooks import BatchSteering, build_tables, make_site_hook
    from infrastructure.steering.sites import site_module
    from infrastructure.steering.spec import SteeringSpec, ortho_op

    grabbed = {}
    handle = site_module(loaded_model.model, 15).register_forward_hook(
        lambda m, a, out: grabbed.setdefault("h", (out[0] if isinstance(out, tuple) else out).detach().clone())
    )
    try:
        ids = loaded_model.tokenizer("The sea is calm tonight.", return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            loaded_model.model(input_ids=ids.to(loaded_model.device))
    finally:
        handle.remove()
    h = grabbed["h"].float().cpu()
    v, c = torch.tensor(VECTOR) * 3, -0.75
    tables = build_tables([SteeringSpec((ortho_op(15, v, c),))], [()], h.shape[-1], lambda s: h.device, h.dtype)
    state = BatchSteering(tables)
    state.set_mask(torch.ones(h.shape[:2], dtype=torch.bool))
    out = make_site_hook(15, tables[15], state)(None, (), h.clone())
    h64, u64 = h.double(), (v / v.norm()).double()
    along = (h64 @ u64).unsqueeze(-1)
    expected = h64 - along * u64 + c * along * u64
    assert torch.allclose(out.double(), expected, atol=1e-4)
    assert (h64 @ u64).abs().max() > 0.1  # a component worth scaling


async def test_projection_cap_reports_pre_and_post_cap_axis_values(client, runtime):
    """A cap along the axis at the axis layer, far below any natural value (turn value -200): the generated
    turn's post-cap value is at the cap, its pre-cap value (the same tokens through the unsteered model) is not."""
    axis = runtime.axis
    if axis is None:
        pytest.skip(f"no assistant axis for the embedded model: {runtime.axis_problem}")
    cap = {"hook": f"blocks.{axis.layer}.hook_resid_post", "strength": axis.offset - 200.0,
           "steeringVector": axis.direction.tolist()}  # fmt: skip
    body = {"prompt": MESSAGES, "types": ["STEERED", "DEFAULT"], "temperature": 0, "nCompletionTokens": 8,
            "steerMethod": "PROJECTION_CAP", "steerSpecialTokens": True, "vectors": [cap], "stream": False}  # fmt: skip
    answer = (await client.post(CHAT, json=body)).json()
    steered, default = answer["assistantAxis"]
    post = steered["turns"][-1]["pcValuesPostCap"][axis.title]
    pre = steered["turns"][-1]["pcValues"][axis.title]
    assert post <= -200.0 + 1e-2 and pre > post + 1.0
    assert "pcValuesPostCap" not in default["turns"][-1]


async def test_casing_round_trip_end_to_end(client):
    """The same greedy request in both casings: the camelCase answer is the snake_case one, renamed."""
    from api.services.neuronpedia_wire import camelize

    snake = {"prompt": MESSAGES, "types": ["STEERED"], "temperature": 0, "n_completion_tokens": 5, "n_logprobs": 1,
             "vectors": [{"hook": HOOK, "strength": 30.0, "steering_vector": VECTOR}], "stream": False,
             "is_assistant_axis": True}  # fmt: skip
    camel = {"prompt": MESSAGES, "types": ["STEERED"], "temperature": 0, "nCompletionTokens": 5, "nLogprobs": 1,
             "vectors": [{"hook": HOOK, "strength": 30.0, "steeringVector": VECTOR}], "stream": False,
             "isAssistantAxis": True}  # fmt: skip
    a, b = (await client.post(CHAT, json=snake)).json(), (await client.post(CHAT, json=camel)).json()
    assert "chat_template" in json.dumps(a) and "chatTemplate" in json.dumps(b)
    assert camelize(a)["outputs"] == b["outputs"] and camelize(a)["input"] == b["input"]
