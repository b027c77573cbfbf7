"""Prefill-only jobs: teacher-forced forwards over given token sequences, run by the engine's inference thread.

Vector extraction needs no decoding: it reads, per decoder layer, the mean residual over each sequence's
answer span, and the mean log-probability of those answer tokens (optionally under an ADD steering). A
`TeacherForcedJob` carries no generation rows, so the engine's queue admits it without reserving batch room;
the inference loop hands it to `run_prefill_only` between steps (the model only ever runs on that thread),
and its one result comes back on the job's event stream like any generation event.

Shapes: B sequences, T positions (right-padded), L decoder layers, H hidden size. A sequence's span is
[start, end): the positions whose hidden states are averaged and whose tokens are scored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from infrastructure.engine.job import GenerationJob, JobFailed
from infrastructure.errors import InvalidRequestError
from infrastructure.steering.hooks import BatchSteering, HookSet, build_tables
from infrastructure.steering.sites import decoder_layers
from infrastructure.steering.spec import SteeringSpec, add_op


@dataclass(frozen=True)
class ForcedSequence:
    ids: tuple[int, ...]
    start: int  # first answer position
    end: int  # one past the last answer position


@dataclass
class TeacherForcedResult:
    means: torch.Tensor | None  # [B,L,H] float32 on the CPU (None unless asked for)
    token_norms: list[torch.Tensor] | None  # per layer: norms of every answer token (position 0 excluded)
    logprobs: list[float]  # per sequence: mean log-probability per answer token


class TeacherForcedJob(GenerationJob):
    """One batch of sequences to run teacher-forced, optionally steered by `scalar * vector` at `layer`."""

    def __init__(
        self,
        sequences: list[ForcedSequence],
        *,
        want_means: bool = False,
        steer: tuple[int, torch.Tensor, float] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__([], timeout_s)
        for s in sequences:
            if not 0 < s.start < s.end <= len(s.ids):
                raise InvalidRequestError(f"bad answer span [{s.start}, {s.end}) in a {len(s.ids)}-token sequence")
        self.sequences = sequences
        self.want_means = want_means
        self.steer = steer

    async def events(self) -> AsyncIterator[TeacherForcedResult | JobFailed]:
        """The single result (or the failure); cancels the job if the caller goes away first."""
        done = False
        try:
            event = await self._queue.get()
            done = True
            yield event
        finally:
            if not done:
                self.cancel()


async def run_teacher_forced(engine, job: TeacherForcedJob) -> TeacherForcedResult:
    """Submit the job to the engine and wait for its result (raises the job's error)."""
    for s in job.sequences:
        engine.check_prompt(len(s.ids), "examples")
    events = engine.submit(job)
    try:
        async for event in events:
            if isinstance(event, JobFailed):
                raise event.error
            return event
    finally:
        await events.aclose()
    raise RuntimeError("the engine closed the job without a result")


def run_prefill_only(engine, jobs: list) -> list:
    """Inference thread: run every prefill-only job among `jobs` now; return the generation jobs left."""
    rest = []
    for job in jobs:
        if not isinstance(job, TeacherForcedJob):
            rest.append(job)
            continue
        engine._settle()  # a decode step launched ahead must finish before another forward
        try:
            engine.observers.before_forward("prefill")
            result = forward(engine.model, job, engine.pad_id, engine._device_of, engine._table_dtype)
        except Exception as exc:
            engine._fail_jobs([job], exc)
            continue
        engine.stats["prefills"] += 1
        job.emit(result)
    return rest


def _right_pad(seqs: list[tuple[int, ...]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _span_weights(job: TeacherForcedJob, width: int) -> torch.Tensor:
    """[B,T] weights 1/len over each span (a weighted sum over positions is then the span mean)."""
    weights = torch.zeros(len(job.sequences), width)
    for b, s in enumerate(job.sequences):
        weights[b, s.start : s.end] = 1.0 / (s.end - s.start)
    return weights


def forward(model, job: TeacherForcedJob, pad_id: int, device_of, dtype: torch.dtype) -> TeacherForcedResult:
    """One teacher-forced forward of the job's batch (inference thread only). The LM head runs on the
    answer positions alone: the vocabulary projection of every position would cost a fifth of the model."""
    device = next(model.parameters()).device
    ids, attention = _right_pad([s.ids for s in job.sequences], pad_id, device)
    layers = decoder_layers(model)
    hidden_size = int(model.config.hidden_size)
    sums: dict[int, torch.Tensor] = {}
    norms: dict[int, torch.Tensor] = {}
    handles = []
    spec = None if job.steer is None else SteeringSpec((add_op(job.steer[0], job.steer[1], job.steer[2]),))
    steering = BatchSteering(
        build_tables([spec] * len(job.sequences), [()] * len(job.sequences), hidden_size, device_of, dtype)
    )
    steering.set_mask(attention.bool())
    weights = _span_weights(job, ids.shape[1]).to(device)
    picks = weights > 0
    no_sink = picks.clone()
    no_sink[:, 0] = False  # position 0 is an attention sink with an outsized norm

    def tap(k: int):
        def hook(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).float()
            sums[k] = torch.einsum("bt,bth->bh", weights.to(hidden.device), hidden).cpu()
            norms[k] = hidden.norm(dim=-1)[no_sink.to(hidden.device)].cpu()

        return hook

    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    try:
        with torch.inference_mode(), HookSet(model, steering):
            if job.want_means:  # registered after the steering hooks, so they read the steered residual
                handles = [layer.register_forward_hook(tap(k)) for k, layer in enumerate(layers)]
            final = base(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
            scores = _answer_logprobs(model, final, job)
    finally:
        for handle in handles:
            handle.remove()
    if not job.want_means:
        return TeacherForcedResult(None, None, scores)
    means = torch.stack([sums[k] for k in range(len(layers))], dim=1)
    return TeacherForcedResult(means, [norms[k] for k in range(len(layers))], scores)


def _answer_logprobs(model, final: torch.Tensor, job: TeacherForcedJob) -> list[float]:
    """Per sequence: mean log-probability of its answer tokens (the logits at t predict token t+1)."""
    head = model.get_output_embeddings()
    scores = []
    for b, s in enumerate(job.sequences):
        logits = head(final[b, s.start - 1 : s.end - 1]).float()
        targets = torch.tensor(s.ids[s.start : s.end], device=logits.device)
        scores.append(float(torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).mean()))
    return scores
