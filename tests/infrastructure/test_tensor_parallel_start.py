"""Tensor-parallel failures other than a dead worker (test_tensor_parallel.py): a worker that cannot load its
shard fails the start with its own error; a worker that hangs fails the engine after TENSOR_PARALLEL_TIMEOUT_S
(/health 503) instead of hanging it; no process is left either way (gloo on the CPU)."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from infrastructure.engine.tp_workers import TensorParallelGroup
from infrastructure.errors import ModelLoadError


@dataclass
class FailingSource:
    """Rank 0 'loads' at once; every other rank fails (picklable: it travels to the worker)."""

    def load(self, rank: int, world: int, group) -> SimpleNamespace:
        if rank:
            raise RuntimeError("no shard for this rank")
        return SimpleNamespace(model=torch.nn.Linear(2, 2))


def test_a_worker_that_cannot_load_fails_the_start_and_leaves_no_process():
    group = TensorParallelGroup(FailingSource(), 2, "cpu", 30.0)
    try:
        with pytest.raises(ModelLoadError, match="rank 1: RuntimeError: no shard for this rank"):
            group.start()
    finally:
        group.close(5.0)
    assert group.failure is None or "rank 1" in group.failure
    assert not any(p.is_alive() for p in group.procs)
    for pid in group.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not dist.is_initialized()


def test_a_hung_worker_fails_the_engine_after_the_collective_timeout():
    from app.runtime import Runtime
    from app.settings import Settings
    from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
    from infrastructure.errors import GenerationError

    settings = Settings(
        _env_file=None,
        tensor_parallel_size=2,
        device="cpu",
        model_dtype="float32",
        max_batch_size=2,
        kv_cache_tokens=256,
        tensor_parallel_timeout_s=3,
    )
    runtime = Runtime(settings)
    runtime.load()
    try:
        assert runtime.state == "ok", runtime.load_error
        group = runtime.engine.tp
        os.kill(group.pids[0], signal.SIGSTOP)  # alive, never answering
        row = RowRequest(tuple(runtime.loaded.tokenizer("Hello")["input_ids"]), SamplingParams(max_new_tokens=4))
        with pytest.raises(GenerationError):
            asyncio.run(runtime.engine.collect(GenerationJob([row])))
        assert runtime.state == "error" and "tensor-parallel step failed" in runtime.engine.broken
    finally:
        runtime.shutdown(5)
    assert not any(p.is_alive() for p in group.procs)
    assert not dist.is_initialized()
