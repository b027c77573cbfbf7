"""TENSOR_PARALLEL_SIZE=2 on the CPU (gloo): the embedded model sharded over two processes.

One module-scoped server runtime (rank 0 here, one spawned worker; COMPILE=merge: every rank's layers fused, the
row-parallel projections called between the fused pieces) is compared with the session's single-process engine
(transformers' layers): greedy tokens identical (fp32) unsteered, steered (add at one layer, cap at another) and
for a capture's values; one request goes through the HTTP app. The last test kills the worker: /health turns 503,
the runtime stops without hanging, and no worker process is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from app.factory import create_app
from app.runtime import Runtime
from app.settings import Settings
from infrastructure.engine.fusion import is_fused
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.engine.tp_shard import chunks, shard_plan
from infrastructure.errors import ModelLoadError
from infrastructure.steering.spec import Capture, SteeringSpec, add_op, cap_op
from tests.app.support import GREEDY_PROBE, client_for, settles


class _Config:
    def __init__(self, heads: int, kv: int, inner: int = 64, hidden: int = 64) -> None:
        self.num_attention_heads, self.num_key_value_heads = heads, kv
        self.intermediate_size, self.hidden_size = inner, hidden

    def get_text_config(self):
        return self


def test_chunks_are_contiguous_and_even():
    assert chunks(9, 2) == [(0, 5), (5, 4)]
    assert chunks(1536, 2) == [(0, 768), (768, 768)]


def test_uneven_heads_split_by_whole_key_value_groups():
    """SmolLM2-135M: 9 query heads in 3 groups of 3; rank 0 holds groups 0-1, rank 1 group 2."""
    r0, r1 = (shard_plan(_Config(9, 3, 1536, 576), r, 2) for r in (0, 1))
    assert (r0.q_heads, r0.kv_heads, r1.q_heads, r1.kv_heads) == ((0, 6), (0, 2), (6, 3), (2, 1))
    assert r0.head_dim == r1.head_dim == 64 and (r0.mlp, r1.mlp) == ((0, 768), (768, 768))


def test_fewer_key_value_heads_than_ranks_replicates_them():
    plans = [shard_plan(_Config(8, 2), r, 4) for r in range(4)]
    assert [p.kv_heads for p in plans] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [p.q_heads for p in plans] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    with pytest.raises(ModelLoadError, match="whole groups"):
        shard_plan(_Config(6, 2), 0, 4)


def test_tensor_parallelism_and_the_layer_split_are_exclusive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot both be above 1"):
        Settings(_env_file=None, tensor_parallel_size=2, layer_split_size=2)
    assert Settings(_env_file=None, layer_split_size=2).tensor_parallel_size == 1


@pytest.fixture(scope="module")
def tp_runtime():
    settings = Settings(
        _env_file=None,
        tensor_parallel_size=2,
        device="cpu",
        model_dtype="float32",
        max_batch_size=4,
        kv_cache_tokens=1024,
        tensor_parallel_timeout_s=60,
        compile="merge",  # fused layers on every rank (row-parallel o/down called between the pieces), eager on CPU
    )
    runtime = Runtime(settings)
    runtime.load()
    assert runtime.state == "ok", runtime.load_error
    yield runtime
    runtime.shutdown(10)


def _rows(loaded) -> list[RowRequest]:
    tok, gen = loaded.tokenizer, torch.Generator().manual_seed(3)
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    ids = [tuple(tok(text)["input_ids"]) for text in ("The capital of France is", "My favourite animal is the")]
    u = torch.randn(loaded.hidden_size, generator=gen)
    steer = SteeringSpec((add_op(10, torch.randn(loaded.hidden_size, generator=gen), 6.0, True), cap_op(20, u, 0.5)))
    probe = (Capture("probe", 15, u / u.norm()),)
    return [
        RowRequest(ids[0], greedy),
        RowRequest(ids[0], greedy, steer),
        RowRequest(ids[1], greedy, steer, captures=probe),
    ]


def test_greedy_tokens_and_captures_equal_one_process(tp_runtime, engine, loaded_model):
    rows = _rows(loaded_model)
    tp = asyncio.run(tp_runtime.engine.collect(GenerationJob(rows)))
    one = asyncio.run(engine.collect(GenerationJob(rows)))
    assert [f.token_ids for f in tp] == [f.token_ids for f in one]
    assert tp[0].token_ids != tp[1].token_ids  # the steering changed the text
    probe_tp, probe_one = tp[2].captures["probe"], one[2].captures["probe"]
    assert len(probe_tp) == len(probe_one) > 0
    assert max(abs(a - b) for a, b in zip(probe_tp, probe_one)) < 1e-3
    assert tp_runtime.engine.tensor_parallel_size == 2
    assert tp_runtime.engine.stats["steps"] > 0 and tp_runtime.loaded.model.config.num_attention_heads == 6
    assert tp_runtime.engine.chained_launches > 0  # decode steps fed the worker their ids in a broadcast
    assert tp_runtime.engine.compile_mode == "merge" and is_fused(tp_runtime.loaded.model)  # the worker: in its build


async def test_one_request_through_http_equals_one_process(tp_runtime, client):
    async with client_for(create_app(tp_runtime.settings, runtime=tp_runtime)) as tp_client:
        tp = await tp_client.post("/api/v1/generate/baseline", json=GREEDY_PROBE)
        status = (await tp_client.get("/status")).json()
    assert status["engine"]["tensor_parallel_size"] == 2 and status["status"] == "ok"
    assert status["engine"]["tp_graph_reduce"] == "off"  # the CPU: eager steps, every all-reduce through gloo
    one = await client.post("/api/v1/generate/baseline", json=GREEDY_PROBE)
    assert tp.status_code == one.status_code == 200, tp.text
    assert tp.json() == one.json()


def test_vector_extraction_is_refused_not_hung(tp_runtime, loaded_model):
    """Teacher-forced forwards run on rank 0 alone: under tensor parallelism they are refused at submit."""
    from infrastructure.engine.teacher_forced import ForcedSequence, TeacherForcedJob
    from infrastructure.errors import InvalidRequestError

    ids = tuple(loaded_model.tokenizer("Hello there, friend")["input_ids"])
    with pytest.raises(InvalidRequestError, match="TENSOR_PARALLEL_SIZE=1"):
        tp_runtime.engine.submit(TeacherForcedJob([ForcedSequence(ids, 1, len(ids))]))


async def test_dead_worker_makes_health_503_and_the_server_stops_without_orphans(tp_runtime):
    """Runs last in this module: it ends the module's tensor-parallel runtime."""
    group = tp_runtime.engine.tp
    pids = group.pids
    os.kill(pids[0], signal.SIGKILL)
    assert await settles(lambda: tp_runtime.state == "error", 10)
    async with client_for(create_app(tp_runtime.settings, runtime=tp_runtime)) as c:
        health = await c.get("/health")
    assert health.status_code == 503 and "rank 1 exited" in health.json()["detail"]
    started = time.monotonic()
    tp_runtime.shutdown(5)
    assert time.monotonic() - started < 20
    assert not any(p.is_alive() for p in group.procs)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not torch.distributed.is_initialized()
