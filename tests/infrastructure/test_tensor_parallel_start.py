"""Tensor-parallel start-up failures: a worker that cannot load its shard fails the start with its own error,
and no process is left (gloo, no model)."""

from __future__ import annotations

import os
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
