"""Assistant-axis monitoring in completion-chat frames, and stored traits named in `vectors`.

The synthetic-axis tests build a direction from the embedded model's own activations (assistant-like
minus role-play texts) and inject it, with a test trait, into a separate Runtime sharing the session
engine; the real-data test runs only when the persona data for the embedded model exists."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from api.services.chat_common import assistant_spans
from app.runtime import Runtime
from infrastructure.persona.axis_data import TENSORS, AssistantAxis
from infrastructure.prompting import render_chat
from infrastructure.storage.traits import Trait

URL = "/v1/steer/completion-chat"
LAYER = 15
ASSISTANT_TEXTS = [
    "I'd be glad to help. Here is a clear, step-by-step explanation of how to solve the problem.",
    "Certainly. The capital of France is Paris. Let me know if you have any other questions.",
    "As an AI assistant, I can summarize the article for you and highlight the key points.",
]
ROLEPLAY_TEXTS = [
    "Arr, ye landlubber! Me ship sails at dawn and I'll have yer gold or yer head!",
    "I am Lady Morgana, sorceress of the dark forest, and thou shalt kneel before my power!",
    "*draws sword* Stand back, foul beast! No dragon shall pass while I, Sir Cedric, draw breath!",
]
PLAIN_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I boil an egg?"},
    {
        "role": "assistant",
        "content": "Place the egg in a pot of water, bring it to a boil, and cook it for about nine minutes. "
        "Then cool it in cold water so it is easy to peel.",
    },
    {"role": "user", "content": "Thanks! Anything else?"},
]
ROLEPLAY_CHAT = [
    {"role": "user", "content": "Pretend you are a pirate captain."},
    {
        "role": "assistant",
        "content": "Arr, matey! I be Captain Redbeard, terror of the seven seas! Hoist the sails, ye scurvy dogs, "
        "there be treasure to plunder!",
    },
    {"role": "user", "content": "Thanks! Anything else?"},
]


def hidden_at(loaded_model, ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Output of decoder layer LAYER at every position [T,H] (one plain forward pass)."""
    with torch.inference_mode():
        out = loaded_model.model(input_ids=torch.tensor([list(ids)]), output_hidden_states=True)
    return out.hidden_states[LAYER + 1][0].float()


def mean_activation(loaded_model, texts: list[str]) -> torch.Tensor:
    tok = loaded_model.tokenizer
    # position 0 is an attention sink with an outsized norm: leave it out of the means
    return torch.stack([hidden_at(loaded_model, tok(t)["input_ids"])[1:].mean(0) for t in texts]).mean(0)


@pytest.fixture(scope="module")
def axis_runtime(settings, loaded_model, engine) -> Runtime:
    """A Runtime on the session engine with a synthetic assistant axis and a test trait."""
    assistant, roleplay = mean_activation(loaded_model, ASSISTANT_TEXTS), mean_activation(loaded_model, ROLEPLAY_TEXTS)
    diff = assistant - roleplay
    rt = Runtime(settings, owns_engine=False)
    rt.attach(loaded_model, engine)
    rt.axis = AssistantAxis("synthetic", LAYER, diff / diff.norm(), (assistant + roleplay) / 2, title="test axis")
    rt.axis_problem = None
    vector = torch.randn(loaded_model.hidden_size, generator=torch.Generator().manual_seed(11))
    rt.traits.add(Trait("cc_probe", loaded_model.model_id, {LAYER: vector}, {}, Path("cc_probe.json")))
    return rt


@pytest.fixture
async def axis_client(axis_runtime):
    from app.factory import create_app

    transport = httpx.ASGITransport(app=create_app(runtime=axis_runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as c:
        yield c


async def final(client, **fields) -> dict:
    r = await client.post(
        URL, json={"types": ["DEFAULT"], "temperature": 0, "n_completion_tokens": 3, "stream": False} | fields
    )
    assert r.status_code == 200, r.text
    return r.json()


async def test_role_play_turn_scores_lower_than_assistant_turn_on_the_axis(axis_client):
    plain = (await final(axis_client, prompt=PLAIN_CHAT))["assistant_axis"]
    roleplay = (await final(axis_client, prompt=ROLEPLAY_CHAT))["assistant_axis"]
    [plain_entry], [roleplay_entry] = plain, roleplay
    assert plain_entry["type"] == "DEFAULT" and plain_entry["pc_titles"] == ["test axis"]
    assert len(plain_entry["turns"]) == 2  # the prompt's assistant turn and the new one
    plain_value = plain_entry["turns"][0]["pc_values"]["test axis"]
    roleplay_value = roleplay_entry["turns"][0]["pc_values"]["test axis"]
    assert roleplay_value < plain_value
    assert roleplay_entry["turns"][0]["snippet"].startswith("Arr, matey!")
    assert isinstance(plain_entry["turns"][1]["pc_values"]["test axis"], float)


async def test_turn_value_equals_mean_projection_of_its_content_tokens(axis_client, axis_runtime, loaded_model):
    """Captured during generation, yet equal to a second pass over the turn's content tokens."""
    frame = await final(axis_client, prompt=ROLEPLAY_CHAT, types=["STEERED", "DEFAULT"],
                        vectors=[{"strength": 4.0, "trait": "cc_probe"}])  # fmt: skip
    prompt = render_chat(loaded_model.tokenizer, ROLEPLAY_CHAT)
    [(a, b)] = assistant_spans(ROLEPLAY_CHAT, prompt)
    axis = axis_runtime.axis
    expected = float((hidden_at(loaded_model, prompt.ids)[a:b] @ axis.direction).mean()) - axis.offset
    default = frame["assistant_axis"][1]
    assert default["type"] == "DEFAULT"
    assert default["turns"][0]["pc_values"]["test axis"] == pytest.approx(expected, abs=1e-3)


async def test_a_stored_trait_steers_like_its_raw_floats(axis_client, axis_runtime):
    vector = axis_runtime.traits.get("cc_probe").vectors[LAYER].tolist()
    common = {"prompt": PLAIN_CHAT, "types": ["STEERED"], "n_completion_tokens": 8}
    by_name = await final(axis_client, **common, vectors=[{"strength": 6.0, "trait": "cc_probe"}])
    raw_vector = {"hook": f"blocks.{LAYER}.hook_resid_post", "strength": 6.0, "steering_vector": vector}
    raw = await final(axis_client, **common, vectors=[raw_vector])
    unsteered = await final(axis_client, prompt=PLAIN_CHAT, n_completion_tokens=8)
    assert by_name["outputs"][0]["raw"] == raw["outputs"][0]["raw"]
    assert by_name["outputs"][0]["raw"] != unsteered["outputs"][0]["raw"]


async def test_real_persona_data_orders_role_play_below_assistant(client, runtime, settings):
    folder = Path(settings.persona_data_path) / runtime.loaded.model_id
    if runtime.axis is None:
        pytest.skip(f"no persona data for the embedded model ({folder / TENSORS} absent): {runtime.axis_problem}")
    title = runtime.axis.title
    plain = (await final(client, prompt=PLAIN_CHAT))["assistant_axis"][0]["turns"][0]["pc_values"][title]
    roleplay = (await final(client, prompt=ROLEPLAY_CHAT))["assistant_axis"][0]["turns"][0]["pc_values"][title]
    assert roleplay < plain
