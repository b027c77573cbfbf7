"""The paged engine's loop (DECODE_MODE=paged): scheduler, KV-cache manager and model runner, one step
at a time. Mixed into PersonaEngine, which owns the public API, the queue and the observers.

Each turn: take queued jobs (their rows become waiting sequences), drop cancelled and timed-out rows
(their blocks are freed at once), ask the scheduler for the step (decoding rows + prompt chunks within
the token budget), run it, sample every row that finished its input, stream the tokens, publish full
blocks to the prefix cache, retire finished rows. A failed forward fails only the jobs in that step.
"""

from __future__ import annotations

import logging
import time

from infrastructure.engine.detok import Detokenizer
from infrastructure.engine.job import Event, GenerationJob, JobFailed, RowRequest
from infrastructure.engine.launched import Launched
from infrastructure.engine.overlap import OverlapSteps
from infrastructure.engine.paged_rows import PagedRow, steering_key
from infrastructure.engine.paged_start import PagedStart
from infrastructure.engine.prompt_scores import row_scores, split_scored
from infrastructure.engine.rows import resident
from infrastructure.engine.runner import Work
from infrastructure.engine.sampling import RowSampler, plan_greedy, sample
from infrastructure.engine.scheduler import Seq
from infrastructure.engine.teacher_forced import run_prefill_only
from infrastructure.errors import GenerationError, RequestTimeoutError, TokenLimitError

log = logging.getLogger(__name__)


class PagedLoop(OverlapSteps, PagedStart):
    # ---- the step's forward (a seam: tensor_parallel.py sends it to the other ranks first) ----

    def _forward_step(self, works: list[Work], tables: dict, feed=None):
        """One step's forward: a replayed CUDA graph when the step suits one, else the runner's eager forward.
        `feed`: a chained step's input tokens on the device (overlap.py). Returns (logits of the rows that
        sample, captures)."""
        replayed = self._graphs.run(works, tables, self._tables_for[0], feed) if self._graphs else None
        return replayed or self._runner.execute(works, tables, feed)

    # ---- rows in and out ----

    def _take_paged(self) -> bool:
        """Move queued jobs into the scheduler; blocks while idle. False: stop the loop."""
        with self._cv:
            while not self._sched.has_work and not self._pending:
                if self.stopping or self._abort:
                    return False
                self._cv.wait()
            if self._abort:
                return False
            jobs = []
            while self._pending:
                job = self._pending.popleft()
                if job.deadline is not None and time.monotonic() > job.deadline:
                    late = RequestTimeoutError("the request waited longer than its time budget")
                    self._emit([(job, JobFailed(late))])
                elif not job.cancelled:
                    jobs.append(job)
        self._admit(run_prefill_only(self, jobs))  # teacher-forced jobs (vector extraction) run here, whole
        self._count_jobs()
        return True

    def _fail_all_paged(self, error) -> None:
        with self._cv:
            pending = list(self._pending)
            self._pending.clear()
        live = getattr(self, "_live", [])
        self._ahead = None
        jobs = list({id(r.job): r.job for r in live}.values()) + pending
        for row in list(live):
            self._sched.remove(row.seq)
            self._release(row)
        live.clear()
        for job in jobs:
            self._emit([(job, JobFailed(error))])

    def _paged_row(self, job: GenerationJob, index: int, request: RowRequest) -> PagedRow:
        key = steering_key(request.steering)
        request = resident(request, self._device_of, self._table_dtype)
        prompt = list(request.prompt_ids)
        row = PagedRow(
            job=job,
            index=index,
            request=request,
            sampler=RowSampler(request.sampling, int(self.model.config.vocab_size), self.loaded.device, self.tokenizer),
            detok=Detokenizer(self.tokenizer),
            max_new=max(0, min(request.sampling.max_new_tokens, self.context_len - len(prompt))),
            eos_ids=self.eos_ids,
            steer_key=key,
            special_ids=self.special_ids,
        )
        row.steer_bits = row.steer_mask(prompt, True, self.special_ids)
        self._seq_ids += 1
        if request.sampling.prompt_logprobs is not None:
            row.prompt_logprobs = [None]  # the first token has no context to be scored from
        cacheable = not request.captures and row.prompt_logprobs is None  # cached positions yield no values
        lookup = (lambda: row.prompt_keys(self.block_size)) if cacheable else None
        row.seq = Seq(self._seq_ids, prompt, len(prompt), prefix_keys=lookup, payload=row)
        return row

    def _admit(self, jobs: list[GenerationJob]) -> None:
        for job in jobs:
            try:
                rows = [self._paged_row(job, i, req) for i, req in enumerate(job.rows)]
            except Exception as exc:
                self._fail_jobs([job], exc)
                continue
            for row in rows:
                self._live.append(row)
                self._sched.add(row.seq)

    def _drop_paged(self) -> None:
        """Free the rows of cancelled and timed-out jobs (no event for a cancelled job: nobody listens)."""
        now = time.monotonic()
        gone: dict[int, GenerationJob] = {}
        for row in self._live:
            job = row.job
            if job.deadline is not None and now > job.deadline and not job.cancelled:
                self._emit([(job, JobFailed(RequestTimeoutError("the request exceeded its time budget")))])
                job.cancel()
            if job.cancelled:
                gone[id(job)] = job
        if gone:
            self._remove_jobs(gone)
            for job in gone.values():
                self.observers.notify("cancelled", job)

    def _remove_jobs(self, jobs: dict[int, GenerationJob]) -> None:
        for row in [r for r in self._live if id(r.job) in jobs]:
            self._sched.remove(row.seq)
            self._live.remove(row)
            self._release(row)
        self._count_jobs()

    def _release(self, row: PagedRow) -> None:
        """Give back a row's block-table slot (finished, removed or preempted)."""
        if row.slot is not None:
            self._runner.forget(row.slot)
            self._free_slots.append(row.slot)
            row.slot = None

    def _fail_rows(self, rows: list[PagedRow], exc: BaseException) -> None:
        jobs = {id(r.job): r.job for r in rows}
        self._remove_jobs(jobs)
        self._fail_jobs(list(jobs.values()), exc)

    def _fail_alone(self, rows: list[PagedRow]) -> None:
        """Rows the sampler could not serve (non-finite logits): their jobs fail, the step's other rows go on."""
        self.stats["failed_rows"] = self.stats.get("failed_rows", 0) + len(rows)
        for job in {id(r.job): r.job for r in rows}.values():
            log.warning("job %d: non-finite logits, its rows are dropped (the rest of the batch goes on)", job.id)
        error = GenerationError("generation failed: the model produced non-finite values for this request")
        self._fail_rows(rows, error)

    # ---- one step ----

    def _step(self) -> None:
        """Collect the step launched ahead during the last one, or schedule and launch one now, then finish it."""
        launched, self._ahead = self._ahead, None
        if launched is None:
            launched = self._launch_step()
        if launched is not None:
            if self._may_chain(launched):  # the next step queued behind this one, before its tokens are read
                self._ahead = self._chain(launched)
            self._collect_step(launched)
        elif self._sched.running and not self._sched.waiting:  # every running row waits for its reader
            with self._cv:
                self._cv.wait(0.005)  # until a new job arrives, or 5 ms (readers catch up meanwhile)

    def _reader_behind(self, seq: Seq) -> bool:
        """Back-pressure: a row whose client has not read MAX_UNREAD_TOKENS of its job's tokens skips decode
        steps (keeping its blocks) until the client catches up; the rest of the batch goes on."""
        return seq.payload.job.unread_tokens > self.max_unread_tokens

    def _launch_step(self, ahead: bool = False) -> Launched | None:
        """Schedule a step and queue its forward (on CUDA it runs while Python goes on). None: nothing ran.
        Ahead, a failure propagates (the caller drops the launch and the next step schedules it again)."""
        started = time.perf_counter()
        plan = self._sched.schedule()
        for seq in plan.preempted:
            self._release(seq.payload)
        if not plan.items:
            self._unservable()
            return None
        items = [(seq.payload, n) for seq, n in plan.items]
        for row, _ in items:
            if row.slot is None:
                row.slot = self._free_slots.pop()
        prefill = [r for r, n in items if r.seq.computed < r.prompt_len]
        try:
            if prefill:
                self.observers.before_forward("prefill")
        except Exception as exc:  # fault injection: only the rows starting their prompt fail
            self.stats["failed_batches"] += 1  # a failed prefill is a failed batch too
            self._fail_rows(prefill, exc)
            items, prefill = [(r, n) for r, n in items if r in self._live], []
            if not items:
                return None
        rows = [r for r, _ in items]
        works = [self._work(r, n) for r, n in items]
        try:
            if len(prefill) < len(items):
                self.observers.before_forward("decode")
            tables = self._row_tables(rows)
            logits, captured = self._forward_step(works, tables)
            logits, scored = split_scored(rows, works, logits)
            planned = plan_greedy(logits, [r.sampler for r, w in zip(rows, works) if w.wants_logits])
        except Exception as exc:
            if ahead:
                raise
            self.stats["failed_batches"] += 1
            self._fail_rows(rows, exc)
            return None
        return Launched(items, works, prefill, logits, captured, scored, plan.num_tokens, started, planned)

    def _collect_step(self, step: Launched) -> None:
        """Sample the step's rows, record and stream their tokens, retire finished rows. When the step only
        decoded and no row can end, the next step is launched before the tokens are detokenised and streamed."""
        live = {id(r) for r in self._live}  # a row dropped while its step ran ahead gets nothing
        items = [(r, n) for r, n in step.items if id(r) in live]
        if not items:
            return
        rows = [r for r, _ in items]
        if step.ready is not None:  # its results were copied to the host before the next step was queued
            step.ready.synchronize()
        try:
            for row, position, logits in step.scored:
                if id(row) in live:
                    row_scores(row, position, logits)
            samplers = [r.sampler for (r, _), w in zip(step.items, step.works) if w.wants_logits]
            picked = sample(step.logits, samplers, step.planned) if samplers else []
        except Exception as exc:
            self.stats["failed_batches"] += 1
            self._fail_rows(rows, exc)
            return
        # the sampler's guard: a row whose logits are not finite fails its own job, the others go on
        sampling_rows = [r for (r, _), w in zip(step.items, step.works) if w.wants_logits]
        broken = [r for r, token in zip(sampling_rows, picked) if token is None and id(r) in live]
        broken_jobs = {id(r.job) for r in broken}
        tokens = iter(picked)
        accepted: list[tuple[PagedRow, int]] = []
        start = 0
        for (row, n), work in zip(step.items, step.works):
            if id(row.job) in broken_jobs or id(row) not in live:
                start += n
                if work.wants_logits:
                    next(tokens)
                continue
            if not step.advanced:  # (a chained step advanced its rows already)
                row.seq.computed += n
            row.record_span(step.captured, start, row.seq.computed - n, n)
            start += n
            self._publish(row)
            if work.wants_logits and row.max_new > 0:
                token = next(tokens)
                row.fill(token) if step.advanced else row.push(token)
                accepted.append((row, token))
            elif row.seq.computed >= row.prompt_len and row.max_new == 0:
                row.finish_reason = "length"  # prefill-only row: its captures are the result
        ahead = self._ahead is None and not broken and len(accepted) == len(step.items)
        if ahead and self._may_run_ahead_paged(step, accepted):
            try:
                self._ahead = self._launch_step(ahead=True)
                self.ahead_launches += self._ahead is not None
            except Exception:  # the next step schedules it again (and fails its rows if it fails again)
                log.debug("launch ahead failed; the step runs again in turn", exc_info=True)
        events: list[tuple[GenerationJob, Event]] = []
        first = 0
        for row, token in accepted:
            first += not row.generated
            event = row.accept(token)
            if event is not None:
                events.append((row.job, event))
        emitted = time.perf_counter()
        self._emit(events)
        if broken:
            self._fail_alone(broken)
        self._finish([r for r in rows if id(r.job) not in broken_jobs])
        prefill_tokens = sum(n for r, n in items if r in step.prefill)
        self._count(len(accepted), len(rows), prefill_tokens)
        if self.observers.has("step"):
            info = {"rows": len(rows), "tokens": step.num_tokens, "prefill_tokens": prefill_tokens}
            info |= {"first_tokens": first, "started": step.started, "emitted": emitted, "ended": time.perf_counter()}
            info |= {"kv_used_blocks": self._kv.used_blocks, "kv_block_size": self.block_size}
            info["kv_cached_tokens"] = sum(s.computed for s in self._sched.running)
            self.observers.notify("step", info)

    def _may_run_ahead_paged(self, step: Launched, accepted: list[tuple[PagedRow, int]]) -> bool:
        """Launch the next step now? Only a decode-only step whose rows all go on (no end of sequence, no
        length limit, not cancelled), with nothing waiting, no fault hook and a free block for every row (no
        preemption). A row that stops on a stop string anyway computes one unused token."""
        if self.fault is not None or self._pending or self._sched.waiting or step.prefill:
            return False
        if any(n != 1 for _, n in step.items):
            return False
        for row, token in accepted:
            ends = token in row.eos_ids and not row.request.sampling.ignore_eos
            if ends or len(row.generated) + 1 >= row.max_new or row.job.cancelled:
                return False
        return self._kv.free_blocks >= len(self._sched.running)

    def _work(self, row: PagedRow, n: int) -> Work:
        seq = row.seq
        pos = seq.computed
        ends = pos + n == len(seq.tokens) and row.max_new > 0  # a prefill-only row samples nothing
        steer = row.steer_bits[pos : pos + n]
        score = row.prompt_logprobs is not None and pos < row.prompt_len - 1  # the chunk holds scored positions
        return Work(seq.tokens[pos : pos + n], pos, self._kv.table(seq.seq_id), steer, ends, row.slot, score)

    def _row_tables(self, rows: list[PagedRow]) -> dict:
        """Per-row steering tables of the step's rows (rebuilt only when the row set changes)."""
        key = tuple(r.seq.seq_id for r in rows)
        if self._tables_for is None or self._tables_for[0] != key:
            self._tables_for = (key, self._tables_of(rows))
        return self._tables_for[1]

    def _publish(self, row: PagedRow) -> None:
        """Offer the row's newly completed blocks to the prefix cache (again after a preemption: new blocks)."""
        if row.published_for != row.seq.preemptions:
            row.published, row.published_for = 0, row.seq.preemptions
        full = row.seq.computed // self.block_size
        while row.published < full:
            self._kv.publish(row.seq.seq_id, row.published, row.block_key(row.published, self.block_size))
            row.published += 1

    def _finish(self, rows: list[PagedRow]) -> None:
        events = []
        for row in rows:
            if row.finish_reason is None:
                continue
            events.append((row.job, row.finished_event()))
            self._sched.remove(row.seq)
            self._live.remove(row)
            self._release(row)
        self._emit(events)

    def _unservable(self) -> None:
        """Nothing could be scheduled: with nothing running, the queue's head can never fit the pool."""
        if self._sched.running or not self._sched.waiting:
            return
        row = self._sched.waiting[0].payload
        limit = self._kv.num_blocks * self.block_size
        self._fail_rows([row], TokenLimitError(f"{row.prompt_len} prompt tokens do not fit the KV cache ({limit})"))

    def _count(self, sampled: int, rows: int, prefill_tokens: int) -> None:
        self.stats["steps"] += 1
        self.stats["tokens"] += sampled
        self.stats["prefills"] += bool(prefill_tokens)
        self.stats["last_batch"] = rows
        self.stats["max_batch"] = max(self.stats["max_batch"], rows)
        self.stats["preemptions"] = self._sched.preemptions
        self._count_jobs()

    def _count_jobs(self) -> None:
        """Jobs with a running row, and jobs only waiting (read by queue_depth / active_requests)."""
        running = {id(s.payload.job) for s in self._sched.running}
        self._active = len(running)
        self._queued = len({id(s.payload.job) for s in self._sched.waiting} - running)
