"""POST /v1/steer/completion-chat and /runsync end to end on the embedded model (seed 000)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
import torch

from api.schemas.completion_chat import CompletionChatRequest
from api.services.completion_chat import prepare
from infrastructure.engine.job import GenerationJob
from infrastructure.steering.hooks import BatchSteering, HookSet, build_tables
from infrastructure.steering.spec import Capture

URL = "/v1/steer/completion-chat"
LAYER = 15
HOOK = f"blocks.{LAYER}.hook_resid_post"
PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, how are you?"},
]


def unit_vector(seed: int = 0, size: int = 576) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(size, generator=g)
    return (v / v.norm()).tolist()


def body(**overrides) -> dict:
    """Seed 000's example request, with a vector of the embedded model's hidden size."""
    base = {
        "prompt": PROMPT,
        "types": ["STEERED", "DEFAULT"],
        "vectors": [{"hook": HOOK, "strength": 64.0, "steering_vector": unit_vector()}],
        "strength_multiplier": 1.0,
        "seed": 42,
        "temperature": 0.7,
        "freq_penalty": 0.0,
        "n_completion_tokens": 8,
        "steer_method": "SIMPLE_ADDITIVE",
        "normalize_steering": False,
        "steer_special_tokens": False,
    }
    return base | overrides


def sse_frames(text: str) -> list[dict]:
    """The JSON frames of an SSE body (`data: {json}\\n\\n`), skipping `: ping` comments."""
    assert text.endswith("\n\n") and "\r" not in text
    blocks = [b for b in text.strip().split("\n\n") if not b.startswith(":")]
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b.removeprefix("data: ")) for b in blocks]


def completions(frame: dict) -> dict[str, str]:
    return {o["type"]: o["chat_template"][-1]["content"] for o in frame["outputs"]}


async def final(client, payload: dict) -> dict:
    r = await client.post(URL, json=payload | {"stream": False})
    assert r.status_code == 200, r.text
    return r.json()


async def test_seed_example_streams_cumulative_frames_and_ends_with_all_fields(client, runtime):
    r = await client.post(URL, json={"input": body()})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = sse_frames(r.text)
    last = frames[-1]
    prompt_text = last["input"]["raw"]
    assert prompt_text.endswith("<|im_start|>assistant\n") and "Hello, how are you?" in prompt_text
    assert last["input"]["chat_template"] == PROMPT
    assert [o["type"] for o in last["outputs"]] == ["STEERED", "DEFAULT"]
    for out in last["outputs"]:
        reply = out["chat_template"][-1]
        assert out["raw"] == prompt_text + reply["content"] and reply["role"] == "assistant"
        assert out["chat_template"][:-1] == PROMPT and reply["content"]
    for earlier, later in zip(frames, frames[1:]):  # cumulative: every text only grows
        for kind, text in completions(earlier).items():
            assert completions(later)[kind].startswith(text)
    assert all("assistant_axis" not in f for f in frames[:-1])
    if runtime.axis is None:
        assert last["assistant_axis"] == [] and last["assistant_axis_unavailable"] == runtime.axis_problem
    else:
        assert [e["type"] for e in last["assistant_axis"]] == ["STEERED", "DEFAULT"]
    assert completions(last)["STEERED"] != completions(last)["DEFAULT"]


async def test_default_row_equals_the_same_request_with_default_alone(client):
    both = await final(client, body(n_completion_tokens=12))
    alone = await final(client, body(types=["DEFAULT"], n_completion_tokens=12))
    assert completions(both)["DEFAULT"] == completions(alone)["DEFAULT"]
    assert completions(both)["STEERED"] != completions(both)["DEFAULT"]


def rows_of(runtime, payload: dict):
    return prepare(runtime, CompletionChatRequest.model_validate(payload)).rows


async def test_steering_is_identical_with_and_without_kv_cache(runtime, engine, loaded_model):
    payload = body(types=["STEERED"], temperature=0, n_completion_tokens=16, steer_special_tokens=True)
    [row] = rows_of(runtime, payload)
    [done] = await engine.collect(GenerationJob([row]))
    ids = list(row.prompt_ids) + done.token_ids[:-1]  # the last generated token is never fed back
    device, dtype = loaded_model.device, loaded_model.dtype
    state = BatchSteering(tables=build_tables([row.steering], [()], loaded_model.hidden_size, lambda s: device, dtype))
    state.set_mask(torch.ones(1, len(ids), dtype=torch.bool))
    with torch.inference_mode(), HookSet(loaded_model.model, state):
        logits = loaded_model.model(input_ids=torch.tensor([ids], device=device)).logits[0]
    predicted = logits[len(row.prompt_ids) - 1 :].argmax(-1).tolist()
    assert predicted == done.token_ids and len(done.token_ids) > 1


async def probe(engine, rows, direction: list[float]) -> list[list[float]]:
    """Run rows with a capture of h.u at the steered layer; projections per row."""
    cap = Capture("probe", LAYER, torch.tensor(direction))
    done = await engine.collect(GenerationJob([replace(r, captures=(cap,)) for r in rows]))
    return [d.captures["probe"] for d in done]


async def test_projection_cap_caps_at_tau_and_leaves_lower_positions_alone(runtime, engine):
    u = unit_vector(3)
    [free] = await probe(engine, rows_of(runtime, body(types=["DEFAULT"], temperature=0, n_completion_tokens=6)), u)
    tau = sorted(free)[len(free) // 2]
    payload = body(
        types=["STEERED"],
        temperature=0,
        n_completion_tokens=6,
        steer_method="PROJECTION_CAP",
        strength_multiplier=2.0,  # tau = strength_multiplier * strength
        vectors=[{"hook": HOOK, "strength": tau / 2, "steering_vector": [x * 5 for x in u]}],
        steer_special_tokens=True,
    )
    [capped] = await probe(engine, rows_of(runtime, payload), u)
    assert max(capped) <= tau + 1e-3
    n_prompt = len(rows_of(runtime, payload)[0].prompt_ids)
    below = [i for i in range(n_prompt) if free[i] < tau]
    above = [i for i in range(n_prompt) if free[i] > tau + 1e-3]
    assert below and above
    assert all(abs(capped[i] - free[i]) < 1e-4 for i in below)
    assert all(abs(capped[i] - tau) < 1e-3 for i in above)


async def test_special_and_template_positions_are_not_steered_unless_asked(runtime, engine):
    u = unit_vector(5)
    vectors = [{"hook": HOOK, "strength": 8.0, "steering_vector": u}]
    payload = body(temperature=0, n_completion_tokens=2, vectors=vectors)
    chat = prepare(runtime, CompletionChatRequest.model_validate(payload))
    steered, default = await probe(engine, chat.rows, u)
    mask = chat.rows[0].prompt_steer_mask
    assert mask is not None and any(mask) and not all(mask)
    for i, content in enumerate(mask):
        expected = default[i] + 8.0 if content else default[i]
        assert abs(steered[i] - expected) < 1e-3, (i, content)
    everywhere = await probe(engine, rows_of(runtime, payload | {"steer_special_tokens": True})[:1], u)
    assert all(abs(s - d - 8.0) < 1e-3 for s, d in zip(everywhere[0][: len(mask)], default))


async def test_freq_penalty_lowers_repetition(client, loaded_model):
    prompt = [{"role": "user", "content": "Repeat the word 'hello' 50 times."}]
    ratios = []
    for penalty in (0.0, 1.5):
        out = await final(client, body(prompt=prompt, types=["DEFAULT"], vectors=[], temperature=0,
                                       n_completion_tokens=40, freq_penalty=penalty))  # fmt: skip
        ids = loaded_model.tokenizer(completions(out)["DEFAULT"], add_special_tokens=False)["input_ids"]
        ratios.append(len(set(ids)) / len(ids))
    assert ratios[1] > ratios[0]


async def test_disconnect_mid_stream_frees_the_rows(app, engine):
    payload = json.dumps(body(types=["STEERED", "DEFAULT"], n_completion_tokens=400)).encode()
    tokens_before = engine.stats["tokens"]
    gone, sent, first = asyncio.Event(), [], True

    async def receive() -> dict:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body", b"").startswith(b"data:"):
            gone.set()  # the client leaves after the first frame

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": URL, "raw_path": URL.encode(), "query_string": b"", "root_path": "", "client": ("test", 1),
        "server": ("test", 80), "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 120)
    for _ in range(600):
        if engine.active_requests == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.active_requests == 0
    assert sent[0]["status"] == 200
    assert engine.stats["tokens"] - tokens_before < 2 * 400  # the rows left long before their 400 tokens


ZERO = [0.0] * 576


@pytest.mark.parametrize(
    ("overrides", "status", "param"),
    [
        ({"vectors": [{"hook": "blocks.3.attn_out", "strength": 1, "steering_vector": ZERO}]}, 400, "vectors.0.hook"),
        ({"vectors": [{"hook": "blocks.30.hook_resid_post", "strength": 1, "steering_vector": ZERO}]}, 400,
         "vectors.0.hook"),
        ({"vectors": [{"hook": HOOK, "strength": 1, "steering_vector": [1.0] * 575}]}, 400,
         "vectors.0.steering_vector"),
        ({"vectors": [{"hook": HOOK, "strength": 1, "steering_vector": ZERO}], "normalize_steering": True}, 400,
         "vectors.0.steering_vector"),
        ({"vectors": [{"hook": HOOK, "strength": 1, "steering_vector": ZERO}], "steer_method": "PROJECTION_CAP"}, 400,
         "vectors.0.steering_vector"),
        ({"vectors": []}, 400, "vectors"),
        ({"types": ["DEFAULT", "DEFAULT"]}, 422, "types"),
        ({"types": ["BOTH"]}, 422, "types.0"),
        ({"n_completion_tokens": 100_000}, 400, "n_completion_tokens"),
        ({"prompt": [{"role": "user", "content": "hello " * 9000}]}, 400, "prompt"),
        ({"prompt": [{"role": "tool", "content": "x"}]}, 422, "prompt.0.role"),
        ({"vectors": [{"hook": HOOK, "strenght": 1, "steering_vector": ZERO}]}, 422, "vectors.0.strength"),
        ({"vectors": [{"strength": 1, "trait": "no_such_trait"}]}, 404, "vectors.0.trait"),
    ],
)  # fmt: skip
async def test_bad_requests_name_the_field_and_never_reach_the_model(client, engine, overrides, status, param):
    prefills = engine.stats["prefills"]
    for url, payload in ((URL, body(**overrides)), ("/runsync", {"input": body(**overrides)})):
        r = await client.post(url, json=payload)
        assert r.status_code == status, r.text
        expected = param if url == URL or status != 422 else f"input.{param}"
        answer = r.json()  # Neuronpedia's flat error: the message is the `error` string
        assert isinstance(answer["error"], str) and answer["error"] and answer["param"] == expected
    assert engine.stats["prefills"] == prefills


async def test_non_finite_vector_is_refused(client):
    raw = json.dumps(body(vectors=[{"hook": HOOK, "strength": 1, "steering_vector": [float("nan")] * 576}]))
    r = await client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["param"].startswith("vectors.0.steering_vector")


async def test_runsync_answers_runpods_shape_with_every_frame(client):
    payload = body(temperature=0, n_completion_tokens=5)
    r = await client.post("/runsync", json={"input": payload, "id": "job-1"})
    assert r.status_code == 200
    answer = r.json()
    assert answer["id"] == "job-1" and answer["status"] == "COMPLETED"
    assert answer["output"][-1] == await final(client, payload)
    assert len(answer["output"]) > 1
