"""PersonaEngine: one per process, one inference thread, iteration-level batching with per-row steering.

Each turn of the loop admits waiting jobs (one batched prefill, merged into the running KV cache), drops
cancelled rows, then runs one decode step for every running row. Steering hooks live for exactly one
forward pass (removed in `finally`): between steps and when idle the model carries no hook of ours.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import torch

from infrastructure.engine.batch import BatchTensors
from infrastructure.engine.detok import Detokenizer
from infrastructure.engine.job import (
    Event,
    GenerationJob,
    JobFailed,
    RowFinished,
    RowRequest,
    SamplingParams,
)
from infrastructure.engine.rows import Row, eos_ids, left_pad_batch, record_captures, resident
from infrastructure.engine.sampling import RowSampler, sample
from infrastructure.errors import (
    EngineUnavailableError,
    GenerationError,
    InvalidRequestError,
    PersonaError,
    QueueFullError,
    RequestTimeoutError,
    TokenLimitError,
)
from infrastructure.model_loader import LoadedModel
from infrastructure.steering.hooks import BatchSteering, HookSet, build_tables
from infrastructure.steering.sites import site_module

log = logging.getLogger(__name__)


class PersonaEngine:
    def __init__(
        self, loaded: LoadedModel, *, max_batch_size: int = 32, max_queue: int = 256, max_model_len: int = 65536
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_len = min(max_model_len, loaded.max_positions)
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.eos_ids = eos_ids(loaded.model, loaded.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.fault: Callable[[str], None] | None = None  # fault injection: called before every forward
        self.ready = False
        self.broken: str | None = None
        self.started_at = time.time()
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "last_batch": 0, "max_batch": 0, "failed_batches": 0}
        self._pending: deque[GenerationJob] = deque()
        self._cv = threading.Condition()
        self._rows: list[Row] = []
        self._batch = BatchTensors()
        self._steering: BatchSteering | None = None
        self.stopping = False
        self._abort = False
        self._site_devices: dict[int, torch.device] = {}
        self._thread = threading.Thread(target=self._run, name="persona-inference", daemon=True)

    # ---- public API (event-loop side) ----

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready and not self.broken and self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return self.ready

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_requests(self) -> int:
        return len({id(r.job) for r in self._rows})

    def submit(self, job: GenerationJob) -> AsyncIterator[Event]:
        """Queue a job (raising at once if it cannot be taken) and return its event stream."""
        if self.broken:
            raise EngineUnavailableError(f"the inference engine failed: {self.broken}")
        if self.stopping or not self.ready:
            raise EngineUnavailableError("the model is not ready" if not self.ready else "the server is shutting down")
        if len(job.rows) > self.max_batch_size:
            raise InvalidRequestError(f"{len(job.rows)} rows exceed MAX_BATCH_SIZE={self.max_batch_size}", "n")
        for row in job.rows:
            self.check_prompt(len(row.prompt_ids))
        job.bind(asyncio.get_running_loop())
        with self._cv:
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are already waiting (MAX_QUEUE)")
            self._pending.append(job)
            self._cv.notify()
        return job.events()

    async def collect(self, job: GenerationJob) -> list[RowFinished]:
        """Run a job to the end; its finished rows in row order (raises the job's error)."""
        done: list[RowFinished] = []
        async for event in self.submit(job):
            if isinstance(event, JobFailed):
                raise event.error
            if isinstance(event, RowFinished):
                done.append(event)
        return sorted(done, key=lambda e: e.row)

    def check_prompt(self, n_tokens: int, param: str = "prompt") -> None:
        if n_tokens < 1:
            raise InvalidRequestError("the prompt is empty", param)
        if n_tokens >= self.context_len:
            raise TokenLimitError(
                f"Text too long: {n_tokens} tokens, max is {self.context_len - 1} (context {self.context_len})", param
            )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work, let running and queued jobs finish for `timeout` s, then fail the rest."""
        with self._cv:
            self.stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort = True
            with self._cv:
                self._cv.notify_all()
            self._thread.join(10)

    # ---- inference thread ----

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._warm_up()
                self.ready = True
                while True:
                    jobs = self._take_jobs()
                    if jobs is None:
                        break
                    if jobs:
                        self._prefill(jobs)
                    self._drop_cancelled()
                    if self._rows:
                        self._decode()
        except BaseException as exc:  # the loop itself broke: report and fail everyone
            self.broken = f"{type(exc).__name__}: {exc}"
            log.exception("inference loop died")
        finally:
            self._fail_all(EngineUnavailableError(self.broken or "the server is shutting down"))

    def _warm_up(self) -> None:
        """One tiny generation through the normal path (also proves the model runs)."""
        ids = tuple(self.tokenizer("Hello")["input_ids"]) or (self.pad_id,)
        job = GenerationJob([RowRequest(ids, SamplingParams(max_new_tokens=2))])
        self._prefill([job])
        while self._rows:
            self._decode()

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
                    job.emit(JobFailed(RequestTimeoutError("the request waited longer than its time budget")))
                    continue
                if job.cancelled:
                    continue
                jobs.append(job)
                room -= len(job.rows)
            return jobs

    @property
    def _table_dtype(self) -> torch.dtype:
        return self.loaded.dtype if self.loaded.dtype.is_floating_point else torch.float32

    def _new_row(self, job: GenerationJob, index: int, request: RowRequest) -> Row:
        vocab = int(self.model.config.vocab_size)
        request = resident(request, self._device_of, self._table_dtype)
        return Row(
            job=job,
            index=index,
            request=request,
            sampler=RowSampler(request.sampling, vocab, self.loaded.device),
            detok=Detokenizer(self.tokenizer),
            max_new=max(1, min(request.sampling.max_new_tokens, self.context_len - len(request.prompt_ids))),
            eos_ids=self.eos_ids,
        )

    def _prefill(self, jobs: list[GenerationJob]) -> None:
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
            logits = self._forward("prefill", steering, ids, attention, positions, cache)
            record_captures(rows, steering, prefill=True)
            tokens = sample(logits, [r.sampler for r in rows])
        except Exception as exc:
            self._fail_jobs(jobs, exc)
            return
        self.stats["prefills"] += 1
        self._batch.merge(cache, attention, positions[:, -1] + 1, torch.tensor(tokens, device=self.loaded.device))
        self._rows.extend(rows)
        self._steering = None
        self._accept(rows, tokens)
        self._retire()

    def _decode(self) -> None:
        rows = self._rows
        if self._steering is None:
            self._steering = self._steering_for(rows)
        ids, attention, positions = self._batch.advance(self._batch.next_token)
        steers = self._steering.steers  # an unsteered batch needs no per-step position mask
        mask = [r.steer_mask(r.generated[-1:], False, self.special_ids) for r in rows] if steers else None
        self._steering.set_mask(self._mask_tensor(mask) if steers else None)
        try:
            logits = self._forward("decode", self._steering, ids, attention, positions, self._batch.cache)
            record_captures(rows, self._steering, prefill=False)
            tokens = sample(logits, [r.sampler for r in rows])
        except Exception as exc:
            self.stats["failed_batches"] += 1
            jobs = list({id(r.job): r.job for r in rows}.values())
            self._rows, self._steering = [], None
            self._batch.clear()
            self._fail_jobs(jobs, exc)
            return
        self.stats["steps"] += 1
        self.stats["last_batch"] = len(rows)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
        self._batch.next_token = torch.tensor(tokens, device=self.loaded.device)
        self._accept(rows, tokens)
        self._retire()

    def _mask_tensor(self, mask: list[list[bool]]) -> torch.Tensor:
        """The step's position mask, copied to the device before the forward is queued: a host-to-device
        copy from inside a hook would stall the CPU until the GPU caught up with the layers before it."""
        return torch.tensor(mask, dtype=torch.bool, device=self.loaded.device)

    def _forward(self, phase: str, steering: BatchSteering, ids, attention, positions, cache) -> torch.Tensor:
        if self.fault is not None:
            self.fault(phase)
        with HookSet(self.model, steering):
            out = self.model(
                input_ids=ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :].float()

    def _steering_for(self, rows: list[Row]) -> BatchSteering:
        tables = build_tables(
            [r.request.steering for r in rows],
            [r.request.captures for r in rows],
            self.loaded.hidden_size,
            self._device_of,
            self._table_dtype,
        )
        return BatchSteering(tables=tables)

    def _device_of(self, site: int) -> torch.device:
        if site not in self._site_devices:
            module = site_module(self.model, site)
            self._site_devices[site] = next(module.parameters()).device
        return self._site_devices[site]

    def _accept(self, rows: list[Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            event = row.accept(token)
            if event is not None:
                row.job.emit(event)
        self.stats["tokens"] += len(tokens)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        timed_out = set()
        for row in self._rows:
            if row.job.deadline is not None and now > row.job.deadline and id(row.job) not in timed_out:
                timed_out.add(id(row.job))
                row.job.emit(JobFailed(RequestTimeoutError("the request exceeded its time budget")))
                row.job.cancel()
            if row.job.cancelled and row.finish_reason is None:
                row.finish_reason = "cancelled"
        self._retire()

    def _retire(self) -> None:
        """Emit the end of every finished row and remove it (and its cache rows) from the batch."""
        keep = []
        for i, row in enumerate(self._rows):
            if row.finish_reason is None:
                keep.append(i)
            elif not row.job.cancelled:
                row.job.emit(row.finished_event())
        if len(keep) != len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._batch.select(keep)
            self._steering = None

    def _fail_jobs(self, jobs: list[GenerationJob], exc: BaseException) -> None:
        error = exc if isinstance(exc, PersonaError) else GenerationError(f"generation failed: {type(exc).__name__}")
        if not isinstance(exc, PersonaError):
            log.error("batch of %d job(s) failed", len(jobs), exc_info=exc)
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        for job in jobs:
            job.emit(JobFailed(error))

    def _fail_all(self, error: PersonaError) -> None:
        jobs = list({id(r.job): r.job for r in self._rows}.values())
        with self._cv:
            jobs += list(self._pending)
            self._pending.clear()
        self._rows, self._steering = [], None
        self._batch.clear()
        for job in jobs:
            job.emit(JobFailed(error))
