"""The shipped persona data fits the embedded model, and steering with it moves the measured projection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infrastructure.persona import activations as act
from infrastructure.persona.axis_data import load_axis, model_folder
from infrastructure.persona.cli import ALL_TRAITS
from infrastructure.persona.evaluation import answer_projection
from infrastructure.steering.spec import Capture
from infrastructure.storage.traits import load_traits

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def store(loaded_model):
    return load_traits(DATA / "vectors", DATA / "prompts", {loaded_model.model_id}, 576, 30)


def test_all_seven_traits_load(store, loaded_model):
    assert loaded_model.hidden_size == 576 and loaded_model.n_layers == 30
    assert store.skipped == {}
    assert sorted(store.traits) == sorted(ALL_TRAITS)
    for trait in store.traits.values():
        assert trait.layers == list(range(30))
        assert all(v.shape == (576,) and torch.isfinite(v).all() for v in trait.vectors.values())
        meta = trait.metadata
        assert meta["hidden_size"] == 576 and meta["n_layers"] == 30 and meta["judge_used"] is False
        assert trait.default_layer == meta["recommended_layer"] and meta["recommended_scalar"] > 0
        prompts = json.loads(trait.prompts_file.read_text())
        assert len(prompts["instruction"]) >= 5 and len(prompts["questions"]) >= 20
        assert len(prompts["eval_questions"]) >= 10


def test_axis_loads(loaded_model):
    folder = model_folder(DATA / "persona", loaded_model.model_id)
    axis = load_axis(folder, loaded_model.hidden_size, loaded_model.n_layers)
    assert axis.layer == 15 and axis.meta["n_roles"] >= 30 and len(axis.meta["heldout_roles"]) >= 3


@pytest.mark.parametrize("name", ALL_TRAITS)
def test_steering_moves_the_projection_at_a_later_layer(name, store, loaded_model, engine):
    """+s raises and -s lowers the projection on the trait direction two layers after the steered one."""
    trait = store.get(name)
    layer, s = trait.default_layer, float(trait.metadata["recommended_scalar"])
    probe = trait.vectors[layer + 2] / trait.vectors[layer + 2].norm()
    prompt = act.chat_ids(loaded_model.tokenizer, "Tell me about your weekend.")
    specs = [act.steering_spec(layer, trait.vectors[layer], c) for c in (-s, 0.0, s)]
    done = act.generate(engine, [prompt] * 3, 3, steering=specs, captures=(Capture("probe", layer + 2, probe),))
    low, mid, high = (answer_projection(f, len(prompt)) for f in done)
    assert low < mid < high
