"""One trait's extraction run, the vector file: either contrastive generations under persona instructions
(models that follow them) or teacher-forced authored answer pairs (the default; works on small models)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from infrastructure.engine.engine import PersonaEngine
from infrastructure.model_loader import LoadedModel
from infrastructure.persona import activations as act
from infrastructure.persona import contrastive_run
from infrastructure.persona.extraction import diff_of_means, file_sha256, vector_file
from infrastructure.persona.judge import judge_score, keep_mask


@dataclass
class ExtractOptions:
    max_new_tokens: int = 40
    temperature: float = 0.0
    batch_size: int = 16
    pairs_per_question: int = 1
    max_questions: int | None = None
    max_pairs: int | None = None
    judge_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    judge_api_key: str | None = None


def contrast_rows(spec: dict, opts: ExtractOptions) -> list[tuple[str, str, str]]:
    """(polarity, system prompt, question) rows: each question under `pairs_per_question` rotating pairs."""
    pairs = spec["instruction"][: opts.max_pairs]
    questions = spec["questions"][: opts.max_questions]
    rows = []
    for i, question in enumerate(questions):
        for j in range(min(opts.pairs_per_question, len(pairs))):
            pair = pairs[(i + j) % len(pairs)]
            rows += [("pos", pair["pos"], question), ("neg", pair["neg"], question)]
    return rows


def _judge(spec: dict, rows: list[tuple[str, str, str]], texts: list[str], opts: ExtractOptions) -> list[bool]:
    scores = [
        judge_score(opts.judge_url, opts.judge_model, spec["trait"], spec["description"], q, t, opts.judge_api_key)
        for (_, _, q), t in zip(rows, texts)
    ]
    keep = [False] * len(rows)
    for polarity in ("pos", "neg"):
        idx = [i for i, r in enumerate(rows) if r[0] == polarity]
        mask = keep_mask([scores[i] for i in idx], positive=polarity == "pos")
        if not any(mask):  # the judge rejected a whole side: keep it unfiltered rather than fail
            mask = [True] * len(idx)
        for i, m in zip(idx, mask):
            keep[i] = m
    return keep


def extract_trait(loaded: LoadedModel, engine: PersonaEngine, prompts_path: Path, opts: ExtractOptions) -> dict:
    """Generate under positive/negative instructions and return the trait's vector-file document."""
    spec = json.loads(Path(prompts_path).read_text())
    trait, tok = spec["trait"], loaded.tokenizer
    rows = contrast_rows(spec, opts)
    prompts = [act.chat_ids(tok, q, system=s) for _, s, q in rows]
    done = act.generate(engine, prompts, opts.max_new_tokens, temperature=opts.temperature, desc=f"{trait} generate")
    answers = [act.answer_ids(f, engine.eos_ids) for f in done]
    keep = [len(a) > 0 for a in answers]
    if opts.judge_url:
        keep = [k and j for k, j in zip(keep, _judge(spec, rows, [f.text for f in done], opts))]
    idx = [i for i, k in enumerate(keep) if k]
    spans = act.response_activations(
        loaded.model,
        [prompts[i] for i in idx],
        [answers[i] for i in idx],
        engine.pad_id,
        opts.batch_size,
        desc=f"{trait} activations",
    )
    polarity = [rows[i][0] for i in idx]
    is_pos = torch.tensor([p == "pos" for p in polarity], dtype=torch.bool)
    pos, neg = spans.means[is_pos], spans.means[~is_pos]
    judge = (
        {"url": opts.judge_url, "model": opts.judge_model, "kept": len(idx), "of": len(rows)}
        if opts.judge_url
        else None
    )
    doc = vector_file(
        trait,
        loaded.model_id,
        diff_of_means(pos, neg),
        spans.median_norms(),
        n_samples={
            "positive": int(pos.shape[0]),
            "negative": int(neg.shape[0]),
            "questions": len({r[2] for r in rows}),
        },
        prompts_sha256=file_sha256(prompts_path),
        description=spec["description"],
        judge=judge,
    )
    doc["metadata"]["generation"] = {
        "max_new_tokens": opts.max_new_tokens,
        "temperature": opts.temperature,
        "pairs_per_question": opts.pairs_per_question,
    }
    doc["metadata"]["samples"] = [
        {"polarity": rows[i][0], "question": rows[i][2], "answer": done[i].text} for i in (idx[:1] + idx[1:2])
    ]
    return doc


def extract_trait_contrastive(
    loaded: LoadedModel, engine: PersonaEngine, prompts_path: Path, max_pairs: int | None = None
) -> dict:
    """The trait's vector file from its authored `contrastive_pairs` (teacher-forced, no generation):
    fitted on one split, layer and scalar range chosen on the other; the eval questions are never read."""
    spec = json.loads(Path(prompts_path).read_text())
    pairs = [(p["question"], p["positive"], p["negative"]) for p in spec["contrastive_pairs"][:max_pairs]]
    result = asyncio.run(contrastive_run.extract(engine, contrastive_run.pair_examples(loaded.tokenizer, pairs)))
    fit_n = result.split["fit"]["positive"]
    doc = vector_file(
        spec["trait"],
        loaded.model_id,
        result.vectors,
        result.resid_medians,
        n_samples={"positive": fit_n, "negative": fit_n, "questions": fit_n},
        prompts_sha256=file_sha256(prompts_path),
        description=spec["description"],
    )
    doc["metadata"].update(result.metadata())
    doc["metadata"]["samples"] = [
        {"polarity": polarity, "question": q, "answer": answer}
        for q, pos, neg in pairs[:1]
        for polarity, answer in (("pos", pos), ("neg", neg))
    ]
    return doc
