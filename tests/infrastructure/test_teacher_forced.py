"""Prefill-only teacher-forced jobs run by the engine match a direct forward, steered or not, and share
the inference thread with generation without disturbing it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.engine.teacher_forced import ForcedSequence, TeacherForcedJob, run_teacher_forced
from infrastructure.errors import GenerationError, InvalidRequestError
from infrastructure.faults import build_fault
from infrastructure.persona import activations as act
from infrastructure.steering.hooks import our_hooks

QA = [
    ("How do I boil an egg?", "Put it in boiling water for nine minutes."),
    ("What is two plus two?", "Four."),
    ("Why is the sky blue?", "Air scatters blue light more than red light, so the sky looks blue."),
]


def _rows(tokenizer):
    prompts = [act.chat_ids(tokenizer, q) for q, _ in QA]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for _, a in QA]
    seqs = [ForcedSequence(tuple(p + a), len(p), len(p) + len(a)) for p, a in zip(prompts, answers)]
    return prompts, answers, seqs


async def test_means_and_logprobs_match_a_direct_forward(loaded_model, engine):
    prompts, answers, seqs = _rows(loaded_model.tokenizer)
    result = await run_teacher_forced(engine, TeacherForcedJob(seqs, want_means=True))
    direct = act.response_activations(loaded_model.model, prompts, answers, engine.pad_id)
    assert result.means.shape == (3, loaded_model.n_layers, loaded_model.hidden_size)
    assert torch.allclose(result.means, direct.means, atol=1e-3, rtol=1e-4)
    expected = act.answer_logprobs(loaded_model.model, prompts, answers, engine.pad_id)
    assert result.logprobs == pytest.approx(expected, abs=1e-4)
    assert all(-20 < x < 0 for x in result.logprobs)


async def test_steered_logprobs_match_a_direct_steered_forward(loaded_model, engine):
    prompts, answers, seqs = _rows(loaded_model.tokenizer)
    vector = torch.randn(loaded_model.hidden_size, generator=torch.Generator().manual_seed(0))
    result = await run_teacher_forced(engine, TeacherForcedJob(seqs, steer=(10, vector, 8.0)))
    expected = act.answer_logprobs(loaded_model.model, prompts, answers, engine.pad_id, (10, vector, 8.0))
    unsteered = act.answer_logprobs(loaded_model.model, prompts, answers, engine.pad_id)
    assert result.means is None
    assert result.logprobs == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(result.logprobs, unsteered)) > 0.05  # the steering did act


async def test_runs_between_decode_steps_without_changing_generation(loaded_model, engine):
    prompt = tuple(act.chat_ids(loaded_model.tokenizer, "Tell me about the sea."))
    sampling = SamplingParams(max_new_tokens=12)
    alone = await engine.collect(GenerationJob([RowRequest(prompt, sampling)]))
    _, _, seqs = _rows(loaded_model.tokenizer)
    generation = asyncio.ensure_future(engine.collect(GenerationJob([RowRequest(prompt, sampling)])))
    forced = [run_teacher_forced(engine, TeacherForcedJob(seqs, want_means=True)) for _ in range(2)]
    together, *results = await asyncio.gather(generation, *forced)
    assert together[0].token_ids == alone[0].token_ids
    assert torch.equal(results[0].means, results[1].means)


async def test_a_failing_forward_fails_only_its_job_and_leaves_no_hook(loaded_model, engine):
    _, _, seqs = _rows(loaded_model.tokenizer)
    engine.fault = build_fault("prefill:1")
    try:
        with pytest.raises(GenerationError):
            await run_teacher_forced(engine, TeacherForcedJob(seqs, steer=(10, torch.ones(576), 1.0)))
    finally:
        engine.fault = None
    assert our_hooks(loaded_model.model) == []
    again = await run_teacher_forced(engine, TeacherForcedJob(seqs))
    assert len(again.logprobs) == 3 and engine.ready and not engine.broken


def test_bad_spans_are_refused():
    with pytest.raises(InvalidRequestError):
        TeacherForcedJob([ForcedSequence((1, 2, 3), 0, 2)])  # the first token has no logit predicting it
    with pytest.raises(InvalidRequestError):
        TeacherForcedJob([ForcedSequence((1, 2, 3), 2, 4)])
