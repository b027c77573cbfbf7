"""Regenerate all shipped persona data for a model: the seven trait vectors, the assistant axis, the report.

pipenv run python -m scripts.build_persona_data            # the embedded SmolLM2-135M-Instruct
pipenv run python -m scripts.build_persona_data --model Qwen/Qwen2.5-7B-Instruct

On a CPU shared with other busy processes, OMP_NUM_THREADS=1 avoids thread oversubscription
(measured here: 5x faster generation at load average 10).
"""

from __future__ import annotations

import argparse
import time

from infrastructure.persona.cli import running_engine
from scripts import build_assistant_axis, evaluate_persona_data, extract_persona_vectors
from scripts.config import settings_for


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--skip-eval", action="store_true")
    args = p.parse_args(argv)
    extra = ["--model", args.model] if args.model else []
    started = time.perf_counter()
    with running_engine(settings_for(args.model)) as (loaded, engine):
        extract_persona_vectors.run(loaded, engine, extract_persona_vectors.parse_args(extra))
        print(f"vectors done at {time.perf_counter() - started:.0f}s")
        build_assistant_axis.run(loaded, engine, build_assistant_axis.parse_args(extra))
        print(f"axis done at {time.perf_counter() - started:.0f}s")
        if not args.skip_eval:
            evaluate_persona_data.run(loaded, engine, evaluate_persona_data.parse_args(extra))
    print(f"all persona data rebuilt in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
