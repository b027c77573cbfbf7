"""Evaluate the shipped persona data on held-out questions and write docs/persona_data_report.md with plots.

pipenv run python -m scripts.evaluate_persona_data
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from infrastructure.persona.axis_data import load_axis, model_folder
from infrastructure.persona.cli import ALL_TRAITS, running_engine
from infrastructure.persona.evaluation import TraitEval, evaluate_axis, evaluate_trait
from infrastructure.persona.report import write_report
from scripts.config import settings_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traits", nargs="+", default=list(ALL_TRAITS))
    p.add_argument("--model", default=None)
    p.add_argument("--vectors-dir", type=Path, default=Path("data/vectors"))
    p.add_argument("--prompts-dir", type=Path, default=Path("data/prompts"))
    p.add_argument("--persona-root", type=Path, default=Path("data/persona"))
    p.add_argument("--roles-file", type=Path, default=Path("data/prompts/assistant_axis_roles.json"))
    p.add_argument("--docs-dir", type=Path, default=Path("docs"))
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--max-questions", type=int, default=None)
    p.add_argument("--engine-batch", type=int, default=32)
    p.add_argument("--no-axis", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def run(loaded, engine, args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    results: list[TraitEval] = []
    for trait in args.traits:
        result = evaluate_trait(
            loaded,
            engine,
            args.vectors_dir / f"{trait}.json",
            args.prompts_dir / f"{trait}_trait.json",
            args.max_new_tokens,
            args.max_questions,
        )
        print(
            f"{trait}: projection {[round(x, 2) for x in result.projection]}, "
            f"preference shift {[round(x, 3) for x in result.preference_shift]}"
        )
        results.append(result)
    axis_result = None
    if not args.no_axis:
        axis = load_axis(model_folder(args.persona_root, loaded.model_id), loaded.hidden_size, loaded.n_layers)
        axis_result = evaluate_axis(loaded, engine, axis, args.roles_file, args.max_new_tokens, args.max_questions)
        print(f"axis AUC {axis_result['auc']:.3f}")
    setup = {"model": loaded.model_id, "max_new_tokens": args.max_new_tokens, "seconds": time.perf_counter() - started}
    path = write_report(args.docs_dir, results, axis_result, setup)
    print(f"report -> {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with running_engine(settings_for(args.model), args.engine_batch) as (loaded, engine):
        run(loaded, engine, args)


if __name__ == "__main__":
    main()
