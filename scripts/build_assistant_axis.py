"""Build the assistant axis: default-assistant minus role-playing response activations, per layer, plus a PCA.

pipenv run python -m scripts.build_assistant_axis            # embedded model -> data/persona/<model id>/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from infrastructure.persona import activations as act
from infrastructure.persona.axis_build import axis_tensors
from infrastructure.persona.axis_data import PC_TITLE, model_folder, save_axis
from infrastructure.persona.cli import running_engine
from infrastructure.persona.extraction import LAYER_CONVENTION, file_sha256
from scripts.config import settings_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--roles-file", type=Path, default=Path("data/prompts/assistant_axis_roles.json"))
    p.add_argument("--out-root", type=Path, default=Path("data/persona"), help="PERSONA_DATA_PATH")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--questions-per-role", type=int, default=4)
    p.add_argument("--max-roles", type=int, default=None)
    p.add_argument("--max-questions", type=int, default=None)
    p.add_argument("--axis-layer", type=int, default=None, help="default: the middle layer")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--engine-batch", type=int, default=32)
    return p.parse_args(argv)


def plan_rows(spec: dict, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(group, system, question) rows: each training role answers a rotating subset of the questions,
    each default-assistant prompt answers all of them. group is a role name or 'default'."""
    held = set(spec["heldout_roles"])
    roles = [r for r in spec["roles"] if r["name"] not in held][: args.max_roles]
    questions = spec["questions"][: args.max_questions]
    per_role = min(args.questions_per_role, len(questions))
    rows = []
    for i, role in enumerate(roles):
        for j in range(per_role):
            rows.append((role["name"], role["system"], questions[(i + j) % len(questions)]))
    rows += [("default", system, q) for system in spec["default_systems"] for q in questions]
    return rows


def run(loaded, engine, args: argparse.Namespace) -> Path:
    spec = json.loads(args.roles_file.read_text())
    rows = plan_rows(spec, args)
    prompts = [act.chat_ids(loaded.tokenizer, q, system=s) for _, s, q in rows]
    done = act.generate(engine, prompts, args.max_new_tokens, desc="axis generate")
    answers = [act.answer_ids(f, engine.eos_ids) for f in done]
    idx = [i for i, a in enumerate(answers) if a]
    spans = act.response_activations(
        loaded.model,
        [prompts[i] for i in idx],
        [answers[i] for i in idx],
        engine.pad_id,
        args.batch_size,
        desc="axis activations",
    )
    groups = [rows[i][0] for i in idx]
    roles = sorted({g for g in groups if g != "default"})
    role_means = torch.stack([spans.means[_mask(groups, r)].mean(0) for r in roles])
    default_means = spans.means[_mask(groups, "default")]
    layer = loaded.n_layers // 2 if args.axis_layer is None else args.axis_layer
    tensors = axis_tensors(default_means, role_means, layer)
    meta = {
        "model_id": loaded.model_id,
        "hidden_size": loaded.hidden_size,
        "n_layers": loaded.n_layers,
        "axis_layer": layer,
        "layer_convention": LAYER_CONVENTION,
        "pc_title": PC_TITLE,
        "source": "scripts/build_assistant_axis.py",
        "n_roles": len(roles),
        "n_default_prompts": len(spec["default_systems"]),
        "n_questions": len({r[2] for r in rows}),
        "n_samples": len(idx),
        "roles": roles,
        "heldout_roles": spec["heldout_roles"],
        "eval_questions": spec["eval_questions"],
        "roles_file": str(args.roles_file),
        "roles_sha256": file_sha256(args.roles_file),
        "max_new_tokens": args.max_new_tokens,
        "axis_norm_at_layer": round(float(tensors["axis"][layer].norm()), 4),
        "median_residual_norm": round(spans.median_norms()[layer], 3),
        "pca_explained_variance_ratio": _ratios(tensors["pca_explained_variance"], role_means[:, layer]),
    }
    folder = model_folder(args.out_root, loaded.model_id)
    save_axis(folder, tensors, meta)
    print(f"axis: layer {layer}, |axis| {meta['axis_norm_at_layer']:.2f}, {len(roles)} roles -> {folder}")
    return folder


def _mask(groups: list[str], name: str) -> torch.Tensor:
    return torch.tensor([g == name for g in groups], dtype=torch.bool)


def _ratios(variance: torch.Tensor, points: torch.Tensor) -> list[float]:
    total = float(points.float().var(0).sum())
    return [round(float(v) / total, 4) for v in variance] if total > 0 else []


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with running_engine(settings_for(args.model), args.engine_batch) as (loaded, engine):
        run(loaded, engine, args)


if __name__ == "__main__":
    main()
