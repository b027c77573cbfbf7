"""TENSOR_PARALLEL_SIZE=N: the paged engine on rank 0 of N processes, each holding a shard of every layer.

Rank 0 is the server: HTTP, the queue, the scheduler, the KV-cache bookkeeping, sampling. It runs the
paged loop unchanged except at two seams: building the model runner (every worker builds the same over
its shard) and running a step's forward (the step's works, the steering tables when the row set changed,
and the block-table slots freed since the last step go to every worker first; then all ranks run the same
forward, meeting in the all-reduces). After each all-reduce the residual stream is the full tensor on every
rank, so steering tables add, cap and capture identically everywhere; rank 0 reads the captures and the
logits (the LM head is on rank 0 alone: replicating it on rank 0 keeps sampling exact and needs no gather,
and the workers skip it). A failure of the distributed step (a rank died, a collective timed out) makes the
engine broken (/health 503) and stops it; request-level failures before the step (validation, fault
injection, a row's non-finite logits) still fail only their request.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.runner import Work, map_tensors
from infrastructure.engine.teacher_forced import TeacherForcedJob
from infrastructure.engine.tp_comm import set_up_reduce
from infrastructure.engine.tp_shard import shard_model, shard_plan, use_reducer
from infrastructure.engine.tp_workers import STACK_DUMP_ENV, ShardSource, TensorParallelGroup
from infrastructure.errors import InvalidRequestError, ModelLoadError
from infrastructure.model_loader import LoadedModel, load_model, resolve_device

log = logging.getLogger(__name__)


@dataclass
class LoaderSource:
    """A rank's shard of the configured checkpoint: loaded by the server's loader into host memory, cut to the
    rank's slices, then moved to the rank's device (the full checkpoint is read by every rank once)."""

    settings: Any  # LoadConfig (the app's Settings)

    def load(self, rank: int, world: int, group) -> LoadedModel:
        if self.settings.quantization != "none":
            raise ModelLoadError("QUANTIZATION needs TENSOR_PARALLEL_SIZE=1 (bitsandbytes weights are not sharded)")
        device = resolve_device(self.settings.device)
        loaded = load_model(self.settings, placement={"device_map": {"": "cpu"}})
        if loaded.quantization != "none":
            raise ModelLoadError(f"a {loaded.quantization} checkpoint cannot be sharded: use TENSOR_PARALLEL_SIZE=1")
        shard_model(loaded.model, shard_plan(loaded.model.config, rank, world), group)
        target = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
        loaded.model.to(target)
        loaded.device, loaded.devices = target, [str(target)]
        return loaded


class TensorParallelEngine(PersonaEngine):
    # rank 0 alone captures in `compiled_step.warm_up` (a warm-up run first meets no worker in its all-reduces): the
    # buckets are captured at their first step, as every rank runs it
    warms_buckets = False

    def __init__(self, loaded: LoadedModel, group: TensorParallelGroup, graph_reduce: str = "auto", **options) -> None:
        super().__init__(loaded, **options)
        self.graph_reduce = graph_reduce  # TENSOR_PARALLEL_GRAPH_REDUCE; the mode in force once the runner is built
        if self.decode_mode != "paged":
            raise ModelLoadError("TENSOR_PARALLEL_SIZE > 1 runs the paged engine: set DECODE_MODE=paged (or auto)")
        self.tp = group
        self.tensor_parallel_size = self.stats["tensor_parallel_size"] = group.world  # shown by /status
        self._sent_key: tuple | None = None
        self._freed_slots: list[int] = []
        group.on_failure = self._rank_failed

    def submit(self, job):
        if isinstance(job, TeacherForcedJob):
            raise InvalidRequestError(
                "vector extraction runs its forward on one process: serve with TENSOR_PARALLEL_SIZE=1 to extract"
            )
        return super().submit(job)

    # ---- the seams of the paged loop ----

    def _build_runner(self, blocks: int, max_blocks: int) -> None:
        """Build rank 0's runner, have every worker build the same, then agree on the decode steps' all-reduce
        (`tp_comm.py`; a collective): CUDA graphs under TP only when it is one that a graph can hold."""
        super()._build_runner(blocks, max_blocks)
        mode = self.graph_reduce if self._graphs is not None else "off"
        shape = dict(blocks=blocks, block_size=self.block_size, dtype=self._kv_dtype, kernel=self.attention_kernel)
        shape |= dict(max_rows=self.max_batch_size, max_blocks=max_blocks, reduce=mode, deadline=self.tp.timeout_s)
        shape["graphs"] = None if self._graphs is None else self._graphs.split_kv_heads
        shape["specials"] = sorted(self.special_ids)  # a chained step's steering bits (overlap.Feed)
        # every rank runs the same arithmetic on the replicated residual stream: rank 0's COMPILE mode (fused layers,
        # compiled pieces and steering) is every worker's
        shape |= dict(compile=self.compile_mode, cache_dir=self.compile_cache_dir)
        self.tp.send(("build", shape))
        mode, reducer = set_up_reduce(mode, self.model, dist.group.WORLD, self.max_batch_size)
        use_reducer(self.model, reducer)
        self.graph_reduce = self.stats["tp_graph_reduce"] = mode  # shown by /status
        if mode == "off":
            self._graphs = None
        elif self._graphs is not None:
            self._graphs.capture_error_mode = "thread_local"
            self._graphs.capture_deadline_s = None if os.environ.get(STACK_DUMP_ENV) else self.tp.timeout_s

    def _release(self, row) -> None:
        if row.slot is not None:  # the workers' runners forget it before the next step too
            self._freed_slots.append(row.slot)
        super()._release(row)

    def _forward_step(self, works: list[Work], tables: dict, feed=None):
        """Send the step to the workers, then run rank 0's part. A chained step (`feed`, overlap.py): its input ids
        are still on rank 0's GPU; they reach the workers' GPUs in a broadcast queued behind the last step (the
        workers' LM heads compute no logits to pick from), and the steering bits' checks travel with the step."""
        key = self._tables_for[0]
        fresh = None
        if key != self._sent_key:  # the row set changed: its tables travel once (on the CPU)
            fresh = {site: map_tensors(table, lambda t: t.cpu()) for site, table in tables.items()}
        freed, self._freed_slots = self._freed_slots, []
        chained = None if feed is None else (feed.checks or [])
        try:
            self.tp.send(("step", (works, fresh, key, freed, chained)))
            self._sent_key = key
            if feed is not None:
                dist.broadcast(feed.tokens, src=0)
            return super()._forward_step(works, tables, feed)
        except Exception as exc:  # the ranks may be out of step now: the engine cannot go on
            self._rank_failed(f"tensor-parallel step failed: {type(exc).__name__}: {exc}")
            raise

    # ---- failure and stop ----

    def _rank_failed(self, reason: str) -> None:
        """A rank died or a distributed step failed: unhealthy at once, the loop stops and fails every job."""
        if self.broken is None:
            self.broken = self.tp.failure or reason
        self._abort = True
        with self._cv:
            self._cv.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine like one process does, then the workers (asked, then terminated, then killed)."""
        if self._thread.ident is not None:  # started
            super().stop(timeout)
        self.tp.close(2.0 if self.broken else 10.0, collectives_idle=not self._thread.is_alive())


def start_tensor_parallel(
    source: ShardSource, world: int, device: str, timeout_s: float, graph_comm: bool = False, **options
) -> tuple[LoadedModel, TensorParallelEngine]:
    """Start the workers, load every rank's shard and build rank 0's engine (not started yet). `graph_comm`:
    all-reduces captured in CUDA graphs get their own NCCL communicator (see RowParallelLinear); `graph_reduce`
    (an option) is TENSOR_PARALLEL_GRAPH_REDUCE (`tp_comm.py`)."""
    group = TensorParallelGroup(source, world, device, timeout_s, graph_comm)
    try:
        loaded = group.start()
        return loaded, TensorParallelEngine(loaded, group, **options)
    except BaseException:
        group.close(5.0)
        raise


def launch_tensor_parallel(settings, **options) -> tuple[LoadedModel, TensorParallelEngine]:
    """The server's TENSOR_PARALLEL_SIZE > 1 path: every rank loads the configured checkpoint's shard."""
    device = resolve_device(settings.device)
    world, timeout = settings.tensor_parallel_size, settings.tensor_parallel_timeout_s
    # decode steps replay CUDA graphs under TP, all-reducing through symmetric memory by default (`tp_comm.py`;
    # NCCL captured in the graph works too on 2 x H200, but that process aborts at exit)
    options["graph_reduce"] = settings.tensor_parallel_graph_reduce
    return start_tensor_parallel(LoaderSource(settings), world, device, timeout, **options)
