"""Held-out evaluation of trait vectors (steer at -s, 0, +s) and of the assistant axis (AUC)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infrastructure.engine.engine import PersonaEngine
from infrastructure.model_loader import LoadedModel
from infrastructure.persona import activations as act
from infrastructure.persona.axis_build import auc
from infrastructure.persona.axis_data import AssistantAxis
from infrastructure.steering.spec import Capture


@dataclass
class TraitEval:
    trait: str
    layer: int  # steered layer
    probe_layer: int  # layer whose activations are projected
    scalars: list[float]
    projection: list[float]  # mean projection on the unit direction at probe_layer, per scalar
    dlogp_positive: list[float]  # steered - unsteered mean log-prob per token of trait-expressing references
    dlogp_negative: list[float]  # the same for trait-free references
    samples: list[list[str]] = field(default_factory=list)  # per scalar: answers to the first eval questions
    base_margin: float = 0.0  # unsteered: mean log-prob per token of trait refs minus trait-free refs
    questions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # the vector file's metadata

    @property
    def preference_shift(self) -> list[float]:
        """How much more likely the trait-expressing references became, relative to the trait-free ones."""
        return [p - n for p, n in zip(self.dlogp_positive, self.dlogp_negative)]

    @property
    def margins(self) -> list[float]:
        """Per scalar: log-likelihood margin of trait over trait-free references (nats/token)."""
        return [self.base_margin + d for d in self.preference_shift]

    @property
    def margin_rise(self) -> float:
        return self.margins[-1] - self.margins[0]

    @property
    def monotonic(self) -> bool:
        return all(a < b for a, b in zip(self.margins, self.margins[1:]))

    @property
    def fluency(self) -> list[float]:
        """Per scalar: perplexity of the trait-free references, steered over unsteered."""
        return [math.exp(-d) for d in self.dlogp_negative]


def answer_projection(finished, prompt_len: int) -> float:
    """Mean captured projection over the positions that produce the answer (last prompt token onwards)."""
    values = finished.captures["probe"][prompt_len - 1 :]
    return sum(values) / len(values)


def steered_projections(
    loaded: LoadedModel,
    engine: PersonaEngine,
    questions: list[str],
    vectors: dict[int, torch.Tensor],
    layer: int,
    probe_layer: int,
    scalars: list[float],
    max_new_tokens: int,
    n_samples: int = 2,
) -> tuple[list[float], list[list[str]]]:
    """Per scalar: mean answer projection at probe_layer on the unit trait direction, and the first answers."""
    prompts = [act.chat_ids(loaded.tokenizer, q) for q in questions]
    direction = vectors[probe_layer] / vectors[probe_layer].norm()
    specs = [act.steering_spec(layer, vectors[layer], s) for s in scalars for _ in prompts]
    done = act.generate(
        engine,
        prompts * len(scalars),
        max_new_tokens,
        steering=specs,
        captures=(Capture("probe", probe_layer, direction),),
        desc="eval generate",
    )
    means, samples = [], []
    for i in range(len(scalars)):
        chunk = done[i * len(prompts) : (i + 1) * len(prompts)]
        means.append(sum(answer_projection(f, len(p)) for f, p in zip(chunk, prompts)) / len(prompts))
        samples.append([f.text for f in chunk[:n_samples]])
    return means, samples


def reference_shifts(
    loaded: LoadedModel,
    engine: PersonaEngine,
    questions: list[str],
    refs: list[str],
    layer: int,
    vector: torch.Tensor,
    scalars: list[float],
) -> tuple[list[float], float]:
    """Per scalar: mean over references of (steered - unsteered) mean log-prob per reference token; and the
    unsteered mean log-prob per token."""
    tok = loaded.tokenizer
    prompts = [act.chat_ids(tok, q) for q in questions]
    answers = [tok(r, add_special_tokens=False)["input_ids"] for r in refs]
    base = act.answer_logprobs(loaded.model, prompts, answers, engine.pad_id)
    shifts = []
    for s in scalars:
        steered = (
            base if s == 0 else act.answer_logprobs(loaded.model, prompts, answers, engine.pad_id, (layer, vector, s))
        )
        shifts.append(sum(a - b for a, b in zip(steered, base)) / len(base))
    return shifts, sum(base) / len(base)


def evaluate_trait(
    loaded: LoadedModel,
    engine: PersonaEngine,
    vector_path: Path,
    prompts_path: Path,
    max_new_tokens: int = 40,
    max_questions: int | None = None,
    probe_offset: int = 2,
) -> TraitEval:
    """Steer at -s, 0, +s (s = the file's recommended scalar) on the held-out questions."""
    doc, spec = json.loads(Path(vector_path).read_text()), json.loads(Path(prompts_path).read_text())
    vectors = {int(k): torch.tensor(v) for k, v in doc["vectors"].items()}
    layer, s = doc["metadata"]["recommended_layer"], float(doc["metadata"]["recommended_scalar"])
    probe = min(layer + probe_offset, max(vectors))
    questions = spec["eval_questions"][:max_questions]
    refs = spec["eval_references"]
    scalars = [-s, 0.0, s]
    projection, samples = steered_projections(loaded, engine, questions, vectors, layer, probe, scalars, max_new_tokens)
    pos, pos_base = reference_shifts(
        loaded, engine, questions, refs["positive"][: len(questions)], layer, vectors[layer], scalars
    )
    neg, neg_base = reference_shifts(
        loaded, engine, questions, refs["negative"][: len(questions)], layer, vectors[layer], scalars
    )
    return TraitEval(
        doc["trait_name"],
        layer,
        probe,
        scalars,
        projection,
        pos,
        neg,
        samples,
        base_margin=pos_base - neg_base,
        questions=questions[: len(samples[0])],
        meta=doc["metadata"],
    )


def axis_values(
    loaded: LoadedModel,
    engine: PersonaEngine,
    axis: AssistantAxis,
    systems: list[str],
    questions: list[str],
    max_new_tokens: int,
) -> list[float]:
    """Monitoring value (mean response projection minus the centre's) of each system x question answer."""
    pairs = [(s, q) for s in systems for q in questions]
    prompts = [act.chat_ids(loaded.tokenizer, q, system=s) for s, q in pairs]
    done = act.generate(
        engine, prompts, max_new_tokens, captures=(Capture("probe", axis.layer, axis.direction),), desc="axis eval"
    )
    return [answer_projection(f, len(p)) - axis.offset for f, p in zip(done, prompts)]


def evaluate_axis(
    loaded: LoadedModel,
    engine: PersonaEngine,
    axis: AssistantAxis,
    roles_path: Path,
    max_new_tokens: int = 40,
    max_questions: int | None = None,
) -> dict:
    """AUC of the monitoring value separating default-assistant answers (positive) from held-out roles."""
    spec = json.loads(Path(roles_path).read_text())
    held = [r["system"] for r in spec["roles"] if r["name"] in set(spec["heldout_roles"])]
    questions = spec["eval_questions"][:max_questions]
    default = axis_values(loaded, engine, axis, spec["default_systems"], questions, max_new_tokens)
    roles = axis_values(loaded, engine, axis, held, questions, max_new_tokens)
    return {"auc": auc(default, roles), "default": default, "roles": roles, "layer": axis.layer}
