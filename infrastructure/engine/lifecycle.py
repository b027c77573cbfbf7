"""Row lifecycle on the inference thread: taking queued jobs, handing out events, retiring finished,
cancelled and timed-out rows, and failing jobs. Mixed into PersonaEngine (which owns the state)."""

from __future__ import annotations

import logging
import time

import torch

from infrastructure.engine.job import Event, GenerationJob, JobFailed, emit_all
from infrastructure.engine.rows import Row
from infrastructure.errors import GenerationError, PersonaError, RequestTimeoutError

log = logging.getLogger("infrastructure.engine.engine")


class RowLifecycle:
    def _emit(self, events: list[tuple[GenerationJob, Event]]) -> None:
        """Hand events to their jobs (one wake-up per event loop) after the observers saw them."""
        if events and self.observers.has("event"):
            for job, event in events:
                self.observers.notify("event", job, event)
        emit_all(events)

    def _take_jobs(self) -> list[GenerationJob] | None:
        """Waiting jobs that fit in the batch; blocks while idle. None: stop the loop."""
        with self._cv:
            while not self._rows and not self._pending:
                if self.stopping or self._abort:
                    return None
                self._cv.wait()
            if self._abort:
                return None
            jobs, room = [], self.max_batch_size - len(self._rows)
            while self._pending and len(self._pending[0].rows) <= room:
                job = self._pending.popleft()
                if job.deadline is not None and time.monotonic() > job.deadline:
                    late = RequestTimeoutError("the request waited longer than its time budget")
                    self._emit([(job, JobFailed(late))])
                    continue
                if job.cancelled:
                    continue
                jobs.append(job)
                room -= len(job.rows)
            return jobs

    def _accept(self, rows: list[Row], tokens: list[int]) -> None:
        """Give every row its token; the step's events go to the event loop(s) in one hand-over."""
        events: list[tuple[GenerationJob, Event]] = []
        for row, token in zip(rows, tokens):
            if row.finish_reason is not None:  # failed by `_guard_rows` in this step
                continue
            event = row.accept(token)
            if event is not None:
                events.append((row.job, event))
        self._emit(events)
        self.stats["tokens"] += len(tokens)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        timed_out = set()
        for row in self._rows:
            if row.job.deadline is not None and now > row.job.deadline and id(row.job) not in timed_out:
                timed_out.add(id(row.job))
                self._emit([(row.job, JobFailed(RequestTimeoutError("the request exceeded its time budget")))])
                row.job.cancel()
            if row.job.cancelled and row.finish_reason is None:
                row.finish_reason = "cancelled"
        self._retire()

    def _retire(self) -> None:
        """Emit the end of every finished row and remove it (and its cache rows) from the batch."""
        keep, events = [], []
        for i, row in enumerate(self._rows):
            if row.finish_reason is None:
                keep.append(i)
            elif not row.job.cancelled:
                events.append((row.job, row.finished_event()))
        self._emit(events)
        if len(keep) != len(self._rows):
            self._rows = [self._rows[i] for i in self._batch.select(keep)]
            self._steering = None

    def _guard_rows(self, rows: list[Row], tokens: list[int | None]) -> list[int]:
        """Rows the sampler could not serve (None: non-finite logits) fail their own job only; the step's
        other rows keep their tokens. Returns every row's token, the pad id standing in for failed rows."""
        failed = {id(row.job): row.job for row, token in zip(rows, tokens) if token is None}
        for row, token in zip(rows, tokens):
            if token is None:
                row.finish_reason = "failed"
                self.stats["failed_rows"] = self.stats.get("failed_rows", 0) + 1
        for job in failed.values():
            log.warning("job %d: non-finite logits, its rows are dropped (the rest of the batch goes on)", job.id)
            error = GenerationError("generation failed: the model produced non-finite values for this request")
            job.emit(JobFailed(error))
            job.cancel()
        return [self.pad_id if token is None else token for token in tokens]

    def _fail_batch(self, rows: list[Row], exc: BaseException) -> None:
        """A step failed: every job with a row in it fails, and the batch starts over empty."""
        self.stats["failed_batches"] += 1
        jobs = list({id(r.job): r.job for r in rows}.values())
        self._rows, self._steering = [], None
        self._batch.clear()
        self._fail_jobs(jobs, exc)

    def _fail_jobs(self, jobs: list[GenerationJob], exc: BaseException) -> None:
        error = exc if isinstance(exc, PersonaError) else GenerationError(f"generation failed: {type(exc).__name__}")
        if not isinstance(exc, PersonaError):
            log.error("batch of %d job(s) failed", len(jobs), exc_info=exc)
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        for job in jobs:
            self._emit([(job, JobFailed(error))])

    def _fail_all(self, error: PersonaError) -> None:
        jobs = list({id(r.job): r.job for r in self._rows}.values())
        with self._cv:
            jobs += list(self._pending)
            self._pending.clear()
        self._rows, self._steering = [], None
        self._batch.clear()
        for job in jobs:
            self._emit([(job, JobFailed(error))])
