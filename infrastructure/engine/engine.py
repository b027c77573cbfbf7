"""PersonaEngine: one per process, one inference thread, iteration-level batching with per-row steering.

DECODE_MODE=paged (the default): a scheduler, a paged KV-cache manager and a model runner
(`paged_loop.py`): ragged chunked prefill shares steps with decoding rows, memory decides how many rows
run. The legacy modes (dynamic / static / graphs) admit waiting jobs with one left-padded prefill merged
into a running cache, then decode every running row. Steering hooks live for exactly one forward pass
(removed in `finally`) or one graph capture: between steps the model carries no hook of ours.
Metrics, traces and fault injection attach through `engine.observers`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import torch

from infrastructure.engine.batch import BatchTensors
from infrastructure.engine.job import (
    Event,
    GenerationJob,
    JobFailed,
    RowFinished,
)
from infrastructure.engine.legacy_loop import LegacyLoop
from infrastructure.engine.lifecycle import RowLifecycle
from infrastructure.engine.observers import EngineObservers
from infrastructure.engine.paged_loop import PagedLoop
from infrastructure.engine.rows import Row, eos_ids
from infrastructure.engine.static_batch import StaticBatch, decode_mode
from infrastructure.engine.teacher_forced import run_prefill_only
from infrastructure.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    QueueFullError,
    TokenLimitError,
)
from infrastructure.model_loader import LoadedModel
from infrastructure.prompting import longest_token_chars
from infrastructure.steering.hooks import BatchSteering, build_tables
from infrastructure.steering.sites import site_module

log = logging.getLogger(__name__)


class PersonaEngine(PagedLoop, LegacyLoop, RowLifecycle):
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_model_len: int = 65536,
        decode: str = "paged",
        static_len: int = 4096,
        block_size: int = 16,
        kv_cache_tokens: int = 0,
        step_tokens: int = 8192,
        prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.9,
        cuda_graphs: bool = True,
        attention: str = "auto",
        max_unread_tokens: int = 256,
        compile: str = "auto",
        compile_cache_dir: str | None = None,
        overlap: bool | str = True,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.decode_mode = decode_mode(decode, loaded)  # paged | dynamic | static | graphs
        self.block_size, self.kv_cache_tokens, self.step_tokens = block_size, kv_cache_tokens, step_tokens
        self.prefix_caching, self.gpu_memory_utilization = prefix_caching, gpu_memory_utilization
        self.cuda_graphs = cuda_graphs  # paged: decode steps replay CUDA graphs on one unquantised GPU
        self.attention = attention  # paged attention kernel: auto | flash | grouped | rows
        self.max_unread_tokens = max_unread_tokens  # paged: a job this far behind its reader stops decoding
        self.compile, self.compile_cache_dir = compile, compile_cache_dir  # paged: COMPILE (compiled_step.py)
        self.compile_mode, self.warmup_seconds = "off", 0.0
        # paged: OVERLAP_SCHEDULE, greedy decode steps chained on the device (overlap.py); auto = on
        self.overlap = overlap not in (False, "off")
        static = self.decode_mode in ("static", "graphs")
        longest = static_len if static else max_model_len  # the static cache's columns
        self.context_len = min(max_model_len, longest, loaded.max_positions)
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.eos_ids = eos_ids(loaded.model, loaded.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.observers = EngineObservers()
        self.ready = False
        self.broken: str | None = None
        self.started_at = time.time()
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "last_batch": 0, "max_batch": 0, "failed_batches": 0}
        self.stats["failed_rows"] = 0  # rows failed alone by the sampler's guard (non-finite logits)
        self.stats["preemptions"] = 0
        self._active = self._queued = 0
        self._pending: deque[GenerationJob] = deque()
        self._cv = threading.Condition()
        self._rows: list[Row] = []
        self._batch: BatchTensors | StaticBatch = BatchTensors()
        self._steering: BatchSteering | None = None
        self._step_mask: tuple[list | None, torch.Tensor | None] = (None, None)
        self.stopping = False
        self._abort = False
        self._site_devices: dict[int, torch.device] = {}
        self._thread = threading.Thread(target=self._run, name="persona-inference", daemon=True)

    # ---- public API (event-loop side) ----

    def start(self) -> None:
        # The inference thread shares the GIL with the event loop; by default a thread waiting for it may
        # wait 5 ms, longer than a GPU decode step. A 0.5 ms switch interval keeps the GPU fed.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready and not self.broken and self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return self.ready

    @property
    def fault(self) -> Callable[[str], None] | None:
        """Fault injection: called before every forward with its phase (an observer hook)."""
        return self.observers.fault

    @fault.setter
    def fault(self, hook: Callable[[str], None] | None) -> None:
        self.observers.fault = hook

    @property
    def queue_depth(self) -> int:
        if self.decode_mode == "paged":
            return len(self._pending) + self._queued
        return len(self._pending)

    @property
    def active_requests(self) -> int:
        if self.decode_mode == "paged":
            return self._active
        return len({id(r.job) for r in self._rows})

    def kv_stats(self) -> dict[str, float]:
        """Paged KV cache: blocks total/used/cached, block size, preemptions, prefix-cache hit rate."""
        kv = getattr(self, "_kv", None)
        if kv is None:
            return {}
        graphs = getattr(self, "_graphs", None)
        replays = {"graph_captures": graphs.captures, "graph_replays": graphs.replays} if graphs else {}
        return kv.snapshot() | {"preemptions": self.stats.get("preemptions", 0)} | replays

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
            if self.queue_depth >= self.max_queue:
                raise QueueFullError(f"{self.queue_depth} requests are already waiting (MAX_QUEUE)")
            self._pending.append(job)
            self._cv.notify()
        self.observers.notify("submitted", job)
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
            longest_token_chars(self.tokenizer)  # cached here, off the event loop (the first prompt check needs it)
            with torch.inference_mode():
                if self.decode_mode == "paged":
                    self._run_paged()
                    return
                if self.decode_mode != "dynamic":
                    graphs = self.decode_mode == "graphs"
                    self._batch = StaticBatch(self.model, self.max_batch_size, self.context_len, graphs)
                self._warm_up()
                self.ready = True
                while True:
                    jobs = self._take_jobs()
                    if jobs is None:
                        break
                    jobs = run_prefill_only(self, jobs)  # teacher-forced jobs (vector extraction): no rows
                    if jobs:
                        self._prefill(jobs)
                    self._drop_cancelled()
                    if self._rows:
                        self._decode()
        except BaseException as exc:  # the loop itself broke: report and fail everyone
            self.broken = f"{type(exc).__name__}: {exc}"
            log.exception("inference loop died")
        finally:
            error = EngineUnavailableError(self.broken or "the server is shutting down")
            self._fail_all_paged(error) if self.decode_mode == "paged" else self._fail_all(error)

    def _run_paged(self) -> None:
        self._start_paged()
        self.ready = True
        while self._take_paged():
            self._drop_paged()
            if self._sched.has_work:
                self._step()

    @property
    def _table_dtype(self) -> torch.dtype:
        return self.loaded.dtype if self.loaded.dtype.is_floating_point else torch.float32

    def _tables_of(self, rows: list[Row]) -> dict:
        """The rows' steering and captures as dense per-site tables (one row each), on each site's device."""
        return build_tables(
            [r.request.steering for r in rows],
            [r.request.captures for r in rows],
            self.loaded.hidden_size,
            self._device_of,
            self._table_dtype,
        )

    def _device_of(self, site: int) -> torch.device:
        if site not in self._site_devices:
            module = site_module(self.model, site)
            self._site_devices[site] = next(module.parameters()).device
        return self._site_devices[site]
