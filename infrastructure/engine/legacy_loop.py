"""The legacy padded-batch loop (DECODE_MODE=dynamic|static|graphs): waiting jobs are prefilled together,
left-padded, then merged into the running batch (growing KV cache, or static slots replayed as CUDA graphs),
and every running row decodes one token per step. Kept for comparison with the paged engine and as the
stopgap for uniform short traffic; a mixin of PersonaEngine (the engine's state lives there)."""

from __future__ import annotations

import time

import torch

from infrastructure.engine.batch import run_forward
from infrastructure.engine.detok import Detokenizer
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.engine.rows import Row, left_pad_batch, record_captures, resident
from infrastructure.engine.sampling import RowSampler, sample
from infrastructure.steering.hooks import BatchSteering


class LegacyLoop:
    """Prefill, decode and run-ahead of the padded batch (`self._batch`: BatchTensors or StaticBatch)."""

    def _warm_up(self) -> None:
        """One tiny generation through the normal path (also proves the model runs)."""
        ids = tuple(self.tokenizer("Hello")["input_ids"]) or (self.pad_id,)
        job = GenerationJob([RowRequest(ids, SamplingParams(max_new_tokens=2))])
        self._prefill([job])
        while self._rows:
            self._decode()

    def _new_row(self, job: GenerationJob, index: int, request: RowRequest) -> Row:
        vocab = int(self.model.config.vocab_size)
        request = resident(request, self._device_of, self._table_dtype)
        return Row(
            job=job,
            index=index,
            request=request,
            sampler=RowSampler(request.sampling, vocab, self.loaded.device, self.tokenizer),
            detok=Detokenizer(self.tokenizer),
            max_new=max(1, min(request.sampling.max_new_tokens, self.context_len - len(request.prompt_ids))),
            eos_ids=self.eos_ids,
        )

    def _prefill(self, jobs: list[GenerationJob]) -> None:
        started = time.perf_counter()
        self._settle()
        try:
            rows = [self._new_row(job, i, req) for job in jobs for i, req in enumerate(job.rows)]
            from transformers import DynamicCache

            ids, attention = left_pad_batch(rows, self.pad_id, self.loaded.device)
            positions = (attention.cumsum(-1) - 1).clamp_min(0)
            steering = self._steering_for(rows)
            width = ids.shape[1]
            mask = [
                [False] * (width - r.prompt_len) + r.steer_mask(list(r.request.prompt_ids), True, self.special_ids)
                for r in rows
            ]
            steering.set_mask(self._mask_tensor(mask))
            cache = DynamicCache(config=self.model.config)
            self.observers.before_forward("prefill")
            logits = run_forward(self.model, steering, ids, attention, positions, cache)
            record_captures(rows, steering.captured, prefill=True)
            tokens = self._guard_rows(rows, sample(logits, [r.sampler for r in rows]))
        except Exception as exc:
            self.stats["failed_batches"] += 1  # a failed prefill is a failed batch too
            self._fail_jobs(jobs, exc)
            return
        self.stats["prefills"] += 1
        self._batch.merge(cache, attention, positions[:, -1] + 1, torch.tensor(tokens, device=self.loaded.device))
        self._rows.extend(rows)
        self._steering = None
        emitted = time.perf_counter()
        self._accept(rows, tokens)
        self._retire()
        if self.observers.has("step"):
            n = sum(r.prompt_len for r in rows)
            info = {"rows": len(rows), "tokens": n, "prefill_tokens": n, "first_tokens": len(rows)}
            self.observers.notify("step", info | {"started": started, "emitted": emitted, "ended": time.perf_counter()})

    def _decode(self, ahead: bool = True) -> None:
        """One decode step: launch it (unless it already is) and collect it. With static slots, when no row can
        finish and nothing waits, the next step is launched before this one's tokens are detokenised and
        streamed, so the GPU does not wait for Python (a row that stops anyway computes one unused token)."""
        rows = self._rows
        try:
            if not self._batch.in_flight:
                self._launch(rows, [r.generated[-1] for r in rows])
            logits, captured = self._batch.collect()
            record_captures(rows, captured, prefill=False)
            tokens = self._guard_rows(rows, sample(logits, [r.sampler for r in rows]))
            self._batch.next_token = torch.tensor(tokens, device=self.loaded.device)
            if ahead and self._may_run_ahead(rows, tokens):
                self._launch(rows, tokens)
        except Exception as exc:
            self._fail_batch(rows, exc)
            return
        self.stats["steps"] += 1
        self.stats["last_batch"] = len(rows)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
        self._accept(rows, tokens)
        self._retire()

    def _launch(self, rows: list[Row], last: list[int]) -> None:
        """Queue a decode step whose inputs are each row's `last` token."""
        if self._steering is None:
            self._steering = self._steering_for(rows)
        steers = self._steering.steers  # an unsteered batch needs no per-step position mask
        mask = [r.steer_mask([t], False, self.special_ids) for r, t in zip(rows, last)] if steers else None
        if mask != self._step_mask[0]:  # usually the same every step: upload it only when it changes
            self._step_mask = (mask, self._mask_tensor(mask) if steers else None)
        self._steering.set_mask(self._step_mask[1])
        self.observers.before_forward("decode")
        self._batch.launch(self.model, self._steering)

    def _may_run_ahead(self, rows: list[Row], tokens: list[int]) -> bool:
        if self.decode_mode == "dynamic" or self.fault is not None or self._pending:
            return False
        for row, token in zip(rows, tokens):
            ends = token in row.eos_ids and not row.request.sampling.ignore_eos
            if ends or len(row.generated) + 1 >= row.max_new or row.job.cancelled:
                return False
        return True

    def _settle(self) -> None:
        """Finish a step launched ahead (rows are about to join, so the slots must be final)."""
        if self._batch.in_flight and self._rows:
            self._decode(ahead=False)
        if self._batch.in_flight:
            self._batch.collect()

    def _mask_tensor(self, mask: list[list[bool]]) -> torch.Tensor:
        """The step's position mask, copied to the device before the forward is queued: a host-to-device
        copy from inside a hook would stall the CPU until the GPU caught up with the layers before it."""
        return torch.tensor(mask, dtype=torch.bool, device=self.loaded.device)

    def _steering_for(self, rows: list[Row]) -> BatchSteering:
        return BatchSteering(tables=self._tables_of(rows))
