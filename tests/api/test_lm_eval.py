"""lm-evaluation-harness (`local-completions`) evaluates the served model over HTTP, unsteered and through a
steering preset, on a small local multiple-choice task (examples/lm_eval); the accuracies and per-choice
log-likelihoods it reports equal the engine's own scores of the same tokens (prompt scoring, steered or not)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest
import torch

from app.factory import create_app
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.steering.spec import SteeringSpec, add_op
from tests.api.live_server import serve

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TASK = Path(__file__).parents[2] / "examples" / "lm_eval"
VECTOR = torch.randn(576, generator=torch.Generator().manual_seed(11))
VECTOR = VECTOR / VECTOR.norm() * 12.0


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The example task with its data file's absolute path (lm-eval resolves it from the working directory)."""
    folder = tmp_path_factory.mktemp("lm_eval_task")
    yaml = (TASK / "persona_mc.yaml").read_text()
    (folder / "persona_mc.yaml").write_text(
        yaml.replace("examples/lm_eval/persona_mc.jsonl", str(TASK / "persona_mc.jsonl"))
    )
    return folder


def evaluate(url: str, model: str, tokenizer_dir: str, task_dir: Path) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {
        "model": model,
        "base_url": f"{url}/v1/completions",
        "tokenizer": tokenizer_dir,
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "num_concurrent": 4,
        "max_retries": 1,
    }
    return simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["persona_mc"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
    )


def args_of(sample: dict) -> list:
    """A logged sample's requests (context, continuation), one per choice."""
    args = sample["arguments"]
    return list(args.values()) if isinstance(args, dict) else list(args)


def split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal encoding: trailing spaces move to the continuation, the whole is encoded, then split."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    return whole[:n], whole[n:]


def engine_logliks(engine, tokenizer, pairs: list[tuple[str, str]], steering) -> list[float]:
    """The engine's own log-likelihood of each continuation (one batch of prefill-only scoring rows)."""
    rows, spans = [], []
    for context, continuation in pairs:
        ctx, cont = split(tokenizer, context, continuation)
        rows.append(RowRequest(tuple(ctx + cont), SamplingParams(max_new_tokens=0, prompt_logprobs=0), steering))
        spans.append(len(ctx))

    async def run() -> list:  # jobs of 8 rows, submitted together (the engine batches them)
        jobs = [engine.collect(GenerationJob(rows[i : i + 8])) for i in range(0, len(rows), 8)]
        return [sorted(d, key=lambda f: f.row) for d in await asyncio.gather(*jobs)]

    done = [row for job in asyncio.run(run()) for row in job]
    return [sum(e.logprob for e in done[i].prompt_logprobs[start:]) for i, start in enumerate(spans)]


def test_lm_eval_scores_match_the_engine_unsteered_and_through_a_preset(
    make_runtime, engine, loaded_model, settings, task_dir, tmp_path
):
    rt = make_runtime(vectors_dir=tmp_path)
    tokenizer_dir = str(Path(settings.model_cache_dir) / "embedded" / "SmolLM2-135M-Instruct")
    steer = {"vectors": [{"vector": VECTOR.tolist(), "scale": 1.0, "layer": 8}]}
    spec = SteeringSpec((add_op(8, VECTOR, 1.0),))
    accuracies, scores = {}, {}
    with serve(create_app(runtime=rt)) as url:
        assert (
            httpx.post(
                f"{url}/api/v1/presets", json={"name": "eval-steered", "steering": steer}, timeout=60
            ).status_code
            == 201
        )
        for model, steering in ((MODEL, None), ("eval-steered", spec)):
            result = evaluate(url, model, tokenizer_dir, task_dir)
            samples = result["samples"]["persona_mc"]
            pairs = [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else tuple(a) for s in samples for a in args_of(s)]
            reported = [r[0][0] for s in samples for r in s["resps"]]
            expected = engine_logliks(engine, loaded_model.tokenizer, pairs, steering)
            assert reported == pytest.approx(expected, abs=1e-3)
            per_doc, k = [], 0
            for s in samples:
                n = len(s["resps"])
                doc = expected[k : k + n]
                per_doc.append(float(max(range(n), key=doc.__getitem__) == s["target"]))
                k += n
            accuracies[model] = result["results"]["persona_mc"]["acc,none"]
            assert accuracies[model] == pytest.approx(sum(per_doc) / len(per_doc))
            scores[model] = reported
    assert len(samples) == 6 and len(scores[MODEL]) == 22
    assert scores["eval-steered"] != pytest.approx(scores[MODEL], abs=1e-2)  # the preset steered the evaluation
