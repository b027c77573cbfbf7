"""Extract persona (trait) vectors: difference of mean answer activations, trait-expressing minus trait-free.

Default method `contrastive`: the authored answer pairs of data/prompts/{trait}_trait.json, teacher-forced;
layer and scalar range chosen on a validation split. Method `generation`: answers generated under positive /
negative persona instructions (for models that follow them; optional LLM judge).

pipenv run python -m scripts.extract_persona_vectors --traits sarcasm flattery
pipenv run python -m scripts.extract_persona_vectors --method generation --model Qwen/Qwen2.5-7B-Instruct --judge-url http://...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from infrastructure.persona.cli import ALL_TRAITS, running_engine
from infrastructure.persona.trait_run import ExtractOptions, extract_trait, extract_trait_contrastive
from scripts.config import settings_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traits", nargs="+", default=list(ALL_TRAITS))
    p.add_argument("--method", choices=("contrastive", "generation"), default="contrastive")
    p.add_argument("--pairs", type=int, default=None, help="contrastive: use the first N authored pairs (>= 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--model", default=None, help="weights id/folder (default: MODEL_NAME or the embedded model)")
    p.add_argument("--prompts-dir", type=Path, default=Path("data/prompts"))
    p.add_argument("--out-dir", type=Path, default=Path("data/vectors"))
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=16, help="rows per teacher-forced forward")
    p.add_argument("--engine-batch", type=int, default=32, help="rows the engine decodes together")
    p.add_argument("--pairs-per-question", type=int, default=1)
    p.add_argument("--max-questions", type=int, default=None)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL; enables the judge filter")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> ExtractOptions:
    return ExtractOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        pairs_per_question=args.pairs_per_question,
        max_questions=args.max_questions,
        max_pairs=args.max_pairs,
        judge_url=args.judge_url,
        judge_model=args.judge_model,
        judge_api_key=os.environ.get("JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
    )


def run(loaded, engine, args: argparse.Namespace) -> list[Path]:
    """Extract every requested trait with an already running engine; returns the files written."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for trait in args.traits:
        started = time.perf_counter()
        prompts = args.prompts_dir / f"{trait}_trait.json"
        if args.method == "contrastive":
            doc = extract_trait_contrastive(loaded, engine, prompts, args.pairs)
        else:
            doc = extract_trait(loaded, engine, prompts, options(args))
        path = args.out_dir / f"{trait}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        meta = doc["metadata"]
        print(
            f"{trait}: layer {meta['recommended_layer']}, |v| {meta['norms'][str(meta['recommended_layer'])]:.2f}, "
            f"scalar {meta['recommended_scalar']}, {time.perf_counter() - started:.0f}s -> {path}"
        )
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with running_engine(settings_for(args.model), args.engine_batch) as (loaded, engine):
        run(loaded, engine, args)


if __name__ == "__main__":
    main()
