"""Seed 000's 70B profile on a Llama-3.3-70B-shaped model small enough for the CPU: 80 decoder layers with
the 70B's hidden size (8,192) and vocabulary-sized tied embeddings, but one 8-wide attention head and an
8-wide MLP per layer. The weights load through OVERRIDE_MODEL_ID while MODEL_ID names the AWQ checkpoint;
persona data is found under PERSONA_DATA_PATH/<MODEL_ID>/, hook blocks.40 is valid, 8,192 floats steer."""

from __future__ import annotations

import pytest
import torch

from app.runtime import Runtime
from app.settings import Settings
from infrastructure.embedded import ensure_embedded
from infrastructure.engine.engine import PersonaEngine
from infrastructure.model_loader import load_model
from infrastructure.persona.axis_data import model_folder, save_axis
from infrastructure.steering.hooks import our_hooks
from tests.helpers import client_for

pytestmark = pytest.mark.slow  # builds and loads an 80-layer, 8,192-wide model on the CPU

LOGICAL = "casperhansen/llama-3.3-70b-instruct-awq"
HIDDEN, LAYERS, AXIS_LAYER = 8192, 80, 40
URL = "/v1/steer/completion-chat"
CHAT = [
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "Tell me a fact."},
]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("llama70b")
    weights = root / "weights"
    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=8,
        vocab_size=49152,  # the embedded tokenizer's (the 70B's is 128,256)
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(weights)
    source = ensure_embedded(Settings(_env_file=None).model_cache_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            (weights / name).write_bytes((source / name).read_bytes())
    direction = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    axis_meta = {"axis_layer": AXIS_LAYER, "model_id": LOGICAL, "pc_title": "Assistant Axis"}
    save_axis(
        model_folder(root / "persona", LOGICAL),
        {"monitor_direction": direction, "monitor_center": 0 * direction},
        axis_meta,
    )
    settings = Settings(
        _env_file=None,
        override_model_id=str(weights),
        model_id=LOGICAL,
        persona_data_path=root / "persona",
        device="cpu",
        model_dtype="bfloat16",
    )
    loaded = load_model(settings)
    engine = PersonaEngine(loaded, max_batch_size=4, max_model_len=settings.max_model_len)
    engine.start()
    assert engine.wait_ready(300), engine.broken
    runtime = Runtime(settings, owns_engine=False)
    runtime.attach(loaded, engine)
    yield runtime, direction / direction.norm()
    engine.stop()
    assert our_hooks(loaded.model) == []


@pytest.fixture
async def client(profile):
    from app.factory import create_app

    async with client_for(create_app(runtime=profile[0]), timeout=300) as c:
        yield c


def test_weights_come_from_the_override_and_data_from_the_logical_id(profile):
    runtime, _ = profile
    loaded = runtime.loaded
    assert (loaded.n_layers, loaded.hidden_size) == (LAYERS, HIDDEN)
    assert loaded.model_id == LOGICAL and loaded.weights_id != LOGICAL
    assert runtime.axis is not None and runtime.axis.layer == AXIS_LAYER, runtime.axis_problem
    assert runtime.settings.token_limit == runtime.settings.max_model_len == 65536


async def test_blocks_40_steers_with_8192_floats_and_the_axis_sees_it(client, profile):
    _, u = profile
    vector = {"hook": f"blocks.{AXIS_LAYER}.hook_resid_post", "strength": 50.0, "steering_vector": u.tolist()}
    body = {
        "prompt": CHAT,
        "types": ["STEERED", "DEFAULT"],
        "vectors": [vector],
        "normalize_steering": True,
        "temperature": 0,
        "n_completion_tokens": 2,
        "stream": False,
    }
    r = await client.post(URL, json=body)
    assert r.status_code == 200, r.text
    steered, default = r.json()["assistant_axis"]
    assert (steered["type"], default["type"]) == ("STEERED", "DEFAULT")
    # the prompt's assistant turn has the same tokens in both rows: at the steered (and captured) layer its
    # projection on u moves by exactly the strength, since the vector is u itself
    before = default["turns"][0]["pc_values"]["Assistant Axis"]
    after = steered["turns"][0]["pc_values"]["Assistant Axis"]
    assert after - before == pytest.approx(50.0, abs=1.0)
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [LOGICAL]


@pytest.mark.parametrize(
    ("hook", "size", "param"),
    [
        ("blocks.80.hook_resid_post", HIDDEN, "vectors.0.hook"),  # layers are 0..79
        ("blocks.40.hook_resid_post", HIDDEN - 1, "vectors.0.steering_vector"),
    ],
)
async def test_out_of_shape_requests_are_refused_naming_the_field(client, hook, size, param):
    vector = {"hook": hook, "strength": 1.0, "steering_vector": [0.01] * size}
    body = {"prompt": CHAT, "types": ["STEERED"], "vectors": [vector], "n_completion_tokens": 1, "stream": False}
    r = await client.post(URL, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == param  # Neuronpedia's flat error shape
