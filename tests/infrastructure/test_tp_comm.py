"""Tensor parallelism's all-reduce plumbing without a model or a process group: which reducer a row-parallel
layer uses, the alternating symmetric-memory buffers, float32 partial sums, the setting, and bounded exits."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from app.settings import Settings
from infrastructure.engine import tp_shard, tp_workers
from infrastructure.engine.tp_comm import set_up_reduce
from infrastructure.engine.tp_shard import RowParallelLinear, shard_model, shard_plan, use_fp32_partials, use_reducer


class _Doubling:
    """A stand-in reducer: 'sums' two identical ranks (x2) and records which buffer half each call used."""

    def __init__(self, limit: int) -> None:
        self.limit, self.halves = limit, []

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() <= self.limit

    def __call__(self, t: torch.Tensor, half: int) -> torch.Tensor:
        self.halves.append(half)
        return t * 2


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_row_parallel_layers_alternate_buffer_halves_and_fall_back_to_nccl_for_big_tensors(monkeypatch):
    model = _tiny_llama()
    shard_model(model, shard_plan(model.config, 0, 2))
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    assert [m.half for m in rows] == [0, 1, 0, 1]  # o_proj, down_proj per layer: consecutive calls differ
    reducer = _Doubling(limit=3 * 16)  # three tokens of hidden 16
    use_reducer(model, reducer)
    reduced = []
    monkeypatch.setattr(tp_shard.dist, "all_reduce", lambda t, group=None: reduced.append(t.shape))
    layer = rows[0]
    x = torch.randn(1, 2, layer.in_features)
    assert torch.allclose(layer(x), 2 * nn.functional.linear(x, layer.weight))
    assert reducer.halves == [0] and reduced == []
    layer(torch.randn(1, 4, layer.in_features))  # four tokens: more than the buffer holds
    assert reducer.halves == [0] and reduced == [torch.Size([1, 4, 16])]
    use_reducer(model, None)
    layer(x)
    assert len(reduced) == 2


def test_float32_partials_stay_off_on_the_cpu_and_the_modes_that_build_nothing_need_no_group():
    model = _tiny_llama()
    shard_model(model, shard_plan(model.config, 0, 2))
    assert not use_fp32_partials(model)  # CPU: torch.mm's out_dtype is a CUDA kernel
    assert all(not m.fp32_partials for m in model.modules() if isinstance(m, RowParallelLinear))
    assert set_up_reduce("off", model, None, 4) == ("off", None)
    assert set_up_reduce("nccl", model, None, 4) == ("nccl", None)
    with pytest.raises(ValueError, match="TENSOR_PARALLEL_GRAPH_REDUCE"):
        set_up_reduce("fast", model, None, 4)


def test_the_graph_reduce_setting():
    from pydantic import ValidationError

    assert Settings(_env_file=None).tensor_parallel_graph_reduce == "auto"
    assert Settings(_env_file=None, tensor_parallel_graph_reduce="off").tensor_parallel_graph_reduce == "off"
    with pytest.raises(ValidationError):
        Settings(_env_file=None, tensor_parallel_graph_reduce="fast")


def test_leaving_a_stuck_group_is_bounded_on_gpus(monkeypatch):
    stuck = threading.Event()
    monkeypatch.setattr(tp_workers.dist, "destroy_process_group", lambda: stuck.wait(30))
    started = time.monotonic()
    tp_workers._leave_group(bounded=True, wait=0.2)
    assert time.monotonic() - started < 2
    stuck.set()


def test_stack_dumps_only_when_asked(monkeypatch):
    monkeypatch.delenv(tp_workers.STACK_DUMP_ENV, raising=False)
    assert tp_workers.dump_stacks_from_env() is False
