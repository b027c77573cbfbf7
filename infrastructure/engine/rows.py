"""Engine-side state of one row: its tokens, sampler, detokeniser, captures and finish rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from infrastructure.engine.detok import Detokenizer
from infrastructure.engine.job import GenerationJob, RowFinished, RowRequest, RowToken, TokenLogprob
from infrastructure.engine.sampling import RowSampler
from infrastructure.steering.spec import Positions


def capture_slots(request: RowRequest) -> list[tuple[str, int, int]]:
    """(name, site, slot) for each capture of a row; slot k = the row's k-th capture at that site
    (the same numbering `build_tables` uses)."""
    seen: dict[int, int] = {}
    slots = []
    for cap in request.captures:
        slot = seen.get(cap.site, 0)
        seen[cap.site] = slot + 1
        slots.append((cap.name, cap.site, slot))
    return slots


def resident(request: RowRequest, device_of: Callable[[int], torch.device], dtype: torch.dtype) -> RowRequest:
    """The request with its steering and capture vectors moved once to their sites' devices, so rebuilding
    a batch's tables when rows join or leave needs no host-to-device copy."""
    spec = request.steering
    if spec is not None:
        spec = replace(spec, ops=tuple(replace(op, vector=op.vector.to(device_of(op.site), dtype)) for op in spec.ops))
    captures = tuple(replace(c, direction=c.direction.to(device_of(c.site), torch.float32)) for c in request.captures)
    return replace(request, steering=spec, captures=captures)


@dataclass
class Row:
    job: GenerationJob
    index: int  # row number within its job
    request: RowRequest
    sampler: RowSampler
    detok: Detokenizer
    max_new: int
    eos_ids: frozenset[int]
    captured: dict[str, list[float]] = field(default_factory=dict)
    finish_reason: str | None = None
    stopped_text: str | None = None  # the text cut before a stop string
    logprobs: list[TokenLogprob] | None = None  # every token's, when the row asks for n_logprobs
    logprobs_sent: int = 0  # how many of them RowTokens already carried
    prompt_logprobs: list[TokenLogprob | None] | None = None  # prompt scoring: one per prompt token scored so far
    prompt_sent: bool = False  # a RowToken carried them

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def generated(self) -> list[int]:
        return self.detok.ids

    def steer_mask(self, token_ids: list[int], prompt: bool, special_ids: frozenset[int]) -> list[bool]:
        """Which of these positions this row's steering applies to."""
        spec = self.request.steering
        if spec is None or spec.is_empty():
            return [False] * len(token_ids)
        if spec.positions is (Positions.RESPONSE if prompt else Positions.PROMPT):
            return [False] * len(token_ids)
        mask = [True] * len(token_ids)
        if prompt and self.request.prompt_steer_mask is not None:
            mask = list(self.request.prompt_steer_mask)
        if not spec.steer_special_tokens:
            mask = [m and t not in special_ids for m, t in zip(mask, token_ids)]
        return mask

    def record(self, values: dict[str, list[float]]) -> None:
        for name, vals in values.items():
            self.captured.setdefault(name, []).extend(vals)

    def accept(self, token_id: int) -> RowToken | None:
        """Take the sampled token; set finish_reason when the row is done. Returns the stream event."""
        params = self.request.sampling
        self.sampler.observe(token_id)
        if params.n_logprobs > 0 and self.sampler.last_logprob is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(self.sampler.last_logprob)
        is_eos = token_id in self.eos_ids and not params.ignore_eos
        delta = "" if is_eos else self.detok.push(token_id)
        if is_eos:
            self.detok.ids.append(token_id)
            self.finish_reason = "stop"
        elif params.stop and self._hit_stop():
            self.finish_reason = "stop"
            delta = ""
        elif self.sampler.constraint is not None and self.sampler.constraint.done:
            self.finish_reason = "stop"  # the structured output is complete
        elif len(self.generated) >= self.max_new:
            self.finish_reason = "length"
        if not delta:
            return None
        fresh = None
        if self.logprobs is not None:
            fresh, self.logprobs_sent = self.logprobs[self.logprobs_sent :], len(self.logprobs)
        event = RowToken(row=self.index, token_id=token_id, delta=delta, text=self.detok.text, logprobs=fresh)
        if self.prompt_logprobs is not None and not self.prompt_sent:  # a stream can echo the scored prompt first
            event.prompt_logprobs, self.prompt_sent = self.prompt_logprobs, True
        return event

    def _hit_stop(self) -> bool:
        text = self.detok.text
        cut = min((i for i in (text.find(s) for s in self.request.sampling.stop) if i >= 0), default=-1)
        if cut < 0:
            return False
        self.stopped_text = text[:cut]
        return True

    def finished_event(self) -> RowFinished:
        reason = self.finish_reason or "stop"
        text = self.stopped_text if self.stopped_text is not None else self.detok.final_text()
        return RowFinished(
            row=self.index,
            text=text,
            token_ids=list(self.generated),
            finish_reason=reason,
            prompt_tokens=self.prompt_len,
            captures=self.captured,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprobs,
        )


def left_pad_batch(rows: list[Row], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids [B,T] left-padded and the attention mask [B,T] for a prefill."""
    width = max(r.prompt_len for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - row.prompt_len :] = torch.tensor(row.request.prompt_ids)
        attention[b, width - row.prompt_len :] = 1
    return ids.to(device), attention.to(device)


def record_captures(rows: list[Row], captured: dict[tuple[int, int], torch.Tensor], prefill: bool) -> None:
    """Copy each row's captured projections [B,T] (its real positions only) out of a forward."""
    if not captured:
        return
    values = {key: value.tolist() for key, value in captured.items()}  # one transfer per capture slot
    for b, row in enumerate(rows):
        n = row.prompt_len if prefill else 1
        row.record({name: values[(site, slot)][b][-n:] for name, site, slot in capture_slots(row.request)})


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends a completion (generation config and tokenizer)."""
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return frozenset(found)
