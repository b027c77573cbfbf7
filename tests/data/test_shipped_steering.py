"""The shipped trait vectors steer: on held-out items (never used to fit or choose them), adding s*v at the
recommended layer with the recommended s, versus -s, raises the log-likelihood margin of the
trait-expressing over the trait-free reference answer by >= 0.4 nats/token, monotonically through 0.
The report (docs/persona_data_report.md) measures the same on all ten held-out items per trait."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infrastructure.engine.teacher_forced import ForcedSequence, TeacherForcedJob, run_teacher_forced
from infrastructure.persona.cli import ALL_TRAITS
from infrastructure.storage.traits import load_traits
from tests.helpers import chat_ids

DATA = Path(__file__).resolve().parents[2] / "data"
ITEMS = 3  # held-out questions per trait in the suite


@pytest.fixture(scope="module")
def store(loaded_model):
    return load_traits(DATA / "vectors", DATA / "prompts", {loaded_model.model_id}, 576, 30)


def _held_out(tokenizer, name: str) -> list[ForcedSequence]:
    """The first ITEMS eval questions with their trait-expressing, then their trait-free references."""
    spec = json.loads((DATA / "prompts" / f"{name}_trait.json").read_text())
    fitted = {p["question"] for p in spec["contrastive_pairs"]}
    questions = spec["eval_questions"][:ITEMS]
    assert not fitted & set(questions)
    seqs = []
    for side in ("positive", "negative"):
        for q, ref in zip(questions, spec["eval_references"][side]):
            prompt = chat_ids(tokenizer, q)
            answer = tuple(tokenizer(ref, add_special_tokens=False)["input_ids"])
            seqs.append(ForcedSequence(prompt + answer, len(prompt), len(prompt) + len(answer)))
    return seqs


@pytest.mark.parametrize("name", ALL_TRAITS)
async def test_recommended_scalar_raises_the_held_out_margin(name, store, loaded_model, engine):
    trait = store.get(name)
    meta = trait.metadata
    assert meta["method"] == "contrastive_authored" and meta["extraction"]["split"]["validation"]["positive"] >= 8
    layer, s = trait.default_layer, float(meta["recommended_scalar"])
    seqs = _held_out(loaded_model.tokenizer, name)
    margins = []
    for scalar in (-s, 0.0, s):
        steer = None if scalar == 0 else (layer, trait.vectors[layer], scalar)
        scores = (await run_teacher_forced(engine, TeacherForcedJob(seqs, steer=steer))).logprobs
        margins.append(sum(scores[:ITEMS]) / ITEMS - sum(scores[ITEMS:]) / ITEMS)
    print(name, layer, s, [round(m, 3) for m in margins])
    assert margins[0] < margins[1] < margins[2]
    assert margins[2] - margins[0] >= 0.4
