"""Contrastive extraction through the engine: fit on one split of the examples, choose the layer and the
scalar range on the other (see `contrastive.py` for the maths). Every forward is a prefill-only
`TeacherForcedJob` run by the engine's inference thread, so a server extracts while it keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from infrastructure.engine.teacher_forced import ForcedSequence, TeacherForcedJob, run_teacher_forced
from infrastructure.persona import contrastive as cx
from infrastructure.prompting import render_chat

Example = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, answer ids)
Progress = Callable[[str, int, int], None]  # (stage, jobs done, jobs in all)


@dataclass
class ContrastiveExamples:
    positive: list[Example]
    negative: list[Example]
    kind: str  # "pairs" | "texts"


@dataclass
class ContrastiveResult:
    vectors: torch.Tensor  # [L,H]
    resid_medians: list[float]
    validation: cx.Validation
    split: dict
    seconds: float

    @property
    def layer(self) -> int:
        return self.validation.layer

    def metadata(self) -> dict:
        """What a vector file (or a registration) records about how this vector was made and chosen."""
        return {
            "method": cx.METHOD,
            **cx.recommendation(self.validation),
            "median_residual_norm": round(self.resid_medians[self.layer], 3),
            "extraction": {
                "method": "teacher-forced difference of mean residuals over answer tokens, per layer",
                "split": self.split,
                "validation": self.validation.as_metadata(),
                "seconds": round(self.seconds, 1),
            },
        }


def _answer(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def pair_examples(tokenizer, pairs: list[tuple[str, str, str]]) -> ContrastiveExamples:
    """(question, positive answer, negative answer) -> both answers after the question's chat prompt."""
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}]).ids for q, _, _ in pairs]
    return ContrastiveExamples(
        [(p, _answer(tokenizer, pos)) for p, (_, pos, _) in zip(prompts, pairs)],
        [(p, _answer(tokenizer, neg)) for p, (_, _, neg) in zip(prompts, pairs)],
        "pairs",
    )


def text_examples(tokenizer, positive: list[str], negative: list[str]) -> ContrastiveExamples:
    """Two sets of free texts, each read after one start token (BOS, else end-of-text) and nothing else."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = (int(start),)
    return ContrastiveExamples(
        [(prefix, _answer(tokenizer, t)) for t in positive],
        [(prefix, _answer(tokenizer, t)) for t in negative],
        "texts",
    )


def _sequences(examples: list[Example]) -> list[ForcedSequence]:
    return [ForcedSequence(p + a, len(p), len(p) + len(a)) for p, a in examples]


class _Runner:
    """Submits batches of sequences as jobs and counts them for progress events."""

    def __init__(self, engine, batch_size: int, total: int, progress: Progress | None) -> None:
        self.engine, self.batch_size, self.total, self.progress = engine, batch_size, total, progress
        self.done = 0

    def jobs_for(self, n: int) -> int:
        return -(-n // self.batch_size)

    async def run(self, stage: str, seqs: list[ForcedSequence], means: bool = False, steer=None) -> list:
        results = []
        for i in range(0, len(seqs), self.batch_size):
            job = TeacherForcedJob(seqs[i : i + self.batch_size], want_means=means, steer=steer)
            results.append(await run_teacher_forced(self.engine, job))
            self.done += 1
            if self.progress is not None:
                self.progress(stage, self.done, self.total)
        return results


async def extract(
    engine,
    examples: ContrastiveExamples,
    *,
    layers: list[int] | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> ContrastiveResult:
    """Fit on the fit split, then score candidate layers and the scalar range on the validation split."""
    started = time.perf_counter()
    pos_fit, pos_val = cx.split(len(examples.positive))
    neg_fit, neg_val = cx.split(len(examples.negative))
    n_layers = engine.loaded.n_layers
    candidates = layers or cx.candidate_layers(n_layers)
    fit_seqs = _sequences([examples.positive[i] for i in pos_fit] + [examples.negative[i] for i in neg_fit])
    val_seqs = _sequences([examples.positive[i] for i in pos_val] + [examples.negative[i] for i in neg_val])
    runner = _Runner(engine, batch_size, 0, progress)
    val_jobs = runner.jobs_for(len(val_seqs))
    extra_fractions = len(set(cx.FRACTIONS) - {cx.PROBE_FRACTION})
    runner.total = runner.jobs_for(len(fit_seqs)) + val_jobs * (1 + 2 * len(candidates) + 2 * extra_fractions)

    fitted = await runner.run("fit", fit_seqs, means=True)
    means = torch.cat([r.means for r in fitted])
    vectors = cx.fit(means[: len(pos_fit)], means[len(pos_fit) :])
    resid = cx.medians([torch.cat([r.token_norms[k] for r in fitted]) for k in range(n_layers)])

    async def logprobs(stage: str, steer=None) -> tuple[list[float], list[float]]:
        scores = [x for r in await runner.run(stage, val_seqs, steer=steer) for x in r.logprobs]
        return scores[: len(pos_val)], scores[len(pos_val) :]

    base_pos, base_neg = await logprobs("baseline")
    cache: dict[tuple[int, float], tuple[list[float], list[float]]] = {}

    async def at(layer: int, fraction: float) -> tuple[float, tuple, tuple]:
        s = cx.scalar_for(fraction, float(vectors[layer].norm()), resid[layer])
        for sign in (-1, 1):
            if (layer, sign * fraction) not in cache:
                cache[(layer, sign * fraction)] = await logprobs("validate", (layer, vectors[layer], sign * s))
        return s, cache[(layer, -fraction)], cache[(layer, fraction)]

    scores = []
    for layer in candidates:
        s, minus, plus = await at(layer, cx.PROBE_FRACTION)
        scores.append(cx.LayerScore(layer, s, cx.margin(*minus), cx.margin(*plus)))
    validation = cx.Validation(cx.margin(base_pos, base_neg), scores)
    for fraction in cx.FRACTIONS:
        s, minus, plus = await at(validation.layer, fraction)
        validation.points.append(
            cx.RangePoint(
                fraction,
                s,
                cx.margin(*minus),
                cx.margin(*plus),
                cx.ppl_ratio(minus[1], base_neg),
                cx.ppl_ratio(plus[1], base_neg),
            )
        )
    if progress is not None:
        progress("done", runner.total, runner.total)
    split = {
        "kind": examples.kind,
        "rule": f"every {cx.VALIDATION_EVERY}th example validates (indices {cx.VALIDATION_EVERY - 1}, ...)",
        "fit": {"positive": len(pos_fit), "negative": len(neg_fit)},
        "validation": {"positive": len(pos_val), "negative": len(neg_val)},
    }
    return ContrastiveResult(vectors, resid, validation, split, time.perf_counter() - started)
