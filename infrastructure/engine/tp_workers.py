"""The processes of tensor parallelism: rank 0 (the server) starts one worker process per other rank.

Every rank joins one torch.distributed process group (NCCL on GPUs, gloo on the CPU; rendezvous on
127.0.0.1 at a free port, like torchrun) through which the sharded layers all-reduce. Step inputs go from
rank 0 to each worker over a torch.multiprocessing pipe: a worker blocks on it while the server is idle
(no collective timeout runs out), and it reads end-of-file the moment rank 0 goes away, so no worker
outlives the server. A worker mirrors rank 0's model runner: told how rank 0 built its runner (`build`), it
builds the same over its shard; told each step's works and changed steering tables (`step`), it runs the
same forward (eager or the same CUDA graph), so the collectives of both line up; its logits are empty and
its captures unread. A watchdog on rank 0 waits on the workers' exit sentinels: a worker that dies reports
the failure at once (the engine turns unhealthy and stops); one that hangs makes rank 0's next collective
fail after TENSOR_PARALLEL_TIMEOUT_S.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infrastructure.errors import ModelLoadError

log = logging.getLogger(__name__)


class ShardSource(Protocol):
    """Builds one rank's shard (picklable: it travels to the worker processes)."""

    def load(self, rank: int, world: int, group) -> Any: ...  # a LoadedModel on the rank's device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


START_TIMEOUT_S = 300.0  # joining (a worker imports torch first) and loading a shard: not a collective's wait


def _init(rank: int, world: int, port: int, device: str, timeout_s: float, graph_comm: bool):
    """Join the process group; returns the communicator for captured all-reduces (None: the default one)."""
    if device == "cuda":
        torch.cuda.set_device(rank)
        # PyTorch's NCCL flight recorder notes every collective (two per layer per eager step): a debugging aid
        # whose per-call cost is paid on the launch path; TORCH_NCCL_TRACE_BUFFER_SIZE set by the operator wins
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "0")
    elif rank:  # workers share the cores (rank 0, the server, keeps its own setting)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device == "cuda" else "gloo"
    patience = timedelta(seconds=max(timeout_s, START_TIMEOUT_S))
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=patience)
    # every rank present first (a worker imports torch for seconds on a busy CPU): the group's own timeout, the
    # collectives' TENSOR_PARALLEL_TIMEOUT_S, then bounds only the connections, not another rank's start-up
    store.set(f"persona/joined/{rank}", "1")
    store.wait([f"persona/joined/{r}" for r in range(world)], patience)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    if not (graph_comm and device == "cuda"):
        return None
    group = dist.new_group(backend=backend)
    dist.all_reduce(torch.zeros(1, device="cuda"), group=group)  # its communicator exists before any capture
    return group


STACK_DUMP_ENV = "TENSOR_PARALLEL_STACK_DUMP_S"  # diagnosis: every rank dumps its threads' stacks every N s


def dump_stacks_from_env() -> bool:
    """With TENSOR_PARALLEL_STACK_DUMP_S=N set, dump every thread's stack to stderr every N seconds (so a hung
    run shows where each rank stands; captures then keep no deadline of their own). Returns whether it is on."""
    seconds = float(os.environ.get(STACK_DUMP_ENV) or 0)
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, repeat=True)
    return seconds > 0


def _leave_group(bounded: bool, wait: float = 5.0) -> None:
    """destroy_process_group, but on GPUs in a daemon thread given `wait` s: on 2 x H200 it did not return after
    NCCL collectives were captured in CUDA graphs (cf. pytorch#115388), and a stopping server must not hang."""

    def leave() -> None:
        with suppress(Exception):
            dist.destroy_process_group()

    if not bounded:
        leave()
        return
    leaving = threading.Thread(target=leave, name="tp-leave-group", daemon=True)
    leaving.start()
    leaving.join(wait)
    if leaving.is_alive():
        log.warning("leaving the NCCL process group did not finish in %.0f s; going on without it", wait)


def _abort_collectives() -> None:
    """Abort the NCCL communicators, so a rank blocked on a dead peer's collective gets an error, not a hang."""
    with suppress(Exception):
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()


class Replica:
    """A worker's copy of rank 0's model runner: built and stepped by rank 0's messages."""

    def __init__(self, loaded) -> None:
        self.loaded, self.runner, self.graphs = loaded, None, None
        self.tables: dict = {}

    def build(
        self, blocks: int, block_size: int, dtype, kernel: str, max_rows: int, max_blocks: int, graphs, reduce,
        deadline, specials=(), compile="off", cache_dir=None,
    ):  # fmt: skip
        """Rank 0's runner shape; `graphs`: None (eager steps) or rank 0's split_kv_heads (CUDA graphs); `reduce`:
        the decode steps' all-reduce, agreed with every rank (`tp_comm.set_up_reduce`, a collective); `specials`:
        the tokenizer's special ids (chained steps' steering bits); `compile`: rank 0's COMPILE mode in effect
        (fused layers, compiled pieces and steering function: `compiled_step.py`)."""
        from infrastructure.engine.compiled_step import prepare, warm_steering
        from infrastructure.engine.graphs import DecodeGraphs
        from infrastructure.engine.runner import ModelRunner
        from infrastructure.engine.tp_comm import set_up_reduce
        from infrastructure.engine.tp_shard import use_reducer

        model = self.loaded.model
        steer = prepare(model, compile, cache_dir)
        if compile == "on":  # the layouts rank 0 compiled at its start, so a first request compiles on no rank
            warm_steering(steer, int(model.config.get_text_config().hidden_size), self.loaded.device, dtype, max_rows)
        self.runner = ModelRunner(model, blocks, block_size, dtype, kernel, max_rows, max_blocks)
        self.runner.steer_fn = steer
        self.specials = torch.tensor(list(specials) or [-1], device=self.runner.device)
        self.graphs = None
        if graphs is not None:
            self.graphs = DecodeGraphs(self.runner, max_rows, blocks * block_size)
            self.graphs.split_kv_heads, self.graphs.capture_error_mode = graphs, "thread_local"
            self.graphs.capture_deadline_s = None if os.environ.get(STACK_DUMP_ENV) else deadline
        mode, reducer = set_up_reduce(reduce, self.loaded.model, dist.group.WORLD, max_rows)
        use_reducer(self.loaded.model, reducer)
        if mode == "off":
            self.graphs = None

    def step(self, works: list, fresh: dict | None, key: tuple, forgotten: list[int], chained=None) -> None:
        """One step as rank 0 runs it. `chained` (a list, maybe empty: per row, whether its steering bit depends
        on the token): the input ids come from rank 0 in a broadcast (overlap.py), not in `works`."""
        from infrastructure.engine.overlap import Feed
        from infrastructure.engine.runner import map_tensors

        for slot in forgotten:
            self.runner.forget(slot)
        if fresh is not None:
            device = self.runner.device
            self.tables = {site: map_tensors(t, lambda x: x.to(device)) for site, t in fresh.items()}
        feed = None
        if chained is not None:
            tokens = torch.empty(len(works), dtype=torch.long, device=self.runner.device)
            dist.broadcast(tokens, src=0)
            feed = Feed.of(tokens, chained or None, self.specials)
        replayed = self.graphs.run(works, self.tables, key, feed) if self.graphs else None
        if replayed is None:
            self.runner.execute(works, self.tables, feed)

    def serve(self, conn) -> None:
        with torch.inference_mode():
            while True:
                kind, payload = conn.recv()  # EOFError when rank 0 is gone: the worker ends
                if kind == "stop":
                    return
                getattr(self, kind)(*payload) if kind == "step" else self.build(**payload)


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)  # the server died without closing our pipe (killed): never an orphan

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def worker_main(source: ShardSource, rank: int, world: int, port: int, options: dict, conn, parent) -> None:
    """A worker process: join the group, load the shard, then serve rank 0's messages until `stop`."""
    from infrastructure.engine.tp_shard import use_graph_group

    _exit_with_parent(parent)
    dump_stacks_from_env()
    try:
        graph_group = _init(rank, world, port, **options)
        loaded = source.load(rank, world, dist.group.WORLD)
        use_graph_group(loaded.model, graph_group)
        conn.send(("ready", None))
        Replica(loaded).serve(conn)
    except BaseException as exc:  # reported to rank 0, whose watchdog sees the exit
        with suppress(Exception):
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        os._exit(1)
    if options["device"] != "cuda":
        _leave_group(bounded=False)
    # On GPUs a worker just exits (the driver frees its communicators): its destroy_process_group never returned
    # within 5 s on 2 x H200 (rank 0 waits for its workers to exit before it leaves the group itself).
    os._exit(0)  # no interpreter teardown (communicator destructors) to wait on


class TensorParallelGroup:
    """Rank 0's side: the worker processes, their pipes, the process group and the watchdog."""

    def __init__(self, source: ShardSource, world: int, device: str, timeout_s: float, graph_comm: bool = False):
        if device == "cuda" and world > torch.cuda.device_count():
            raise ModelLoadError(
                f"TENSOR_PARALLEL_SIZE={world} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        self.source, self.world, self.device, self.timeout_s = source, world, device, timeout_s
        self.options = dict(device=device, timeout_s=timeout_s, graph_comm=graph_comm)
        self.procs: list = []
        self.conns: list = []
        self.on_failure: Callable[[str], None] | None = None
        self.failure: str | None = None
        self.closing = False
        self._watchdog: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self):
        """Spawn the workers, join the group as rank 0, load rank 0's shard, wait for every worker's."""
        from infrastructure.engine.tp_shard import use_graph_group

        ctx = mp.get_context("spawn")
        port = _free_port()
        for rank in range(1, self.world):
            ours, theirs = ctx.Pipe()
            args = (self.source, rank, self.world, port, self.options, theirs, os.getpid())
            proc = ctx.Process(target=worker_main, args=args, name=f"persona-tp-rank{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()
        try:
            graph_group = _init(0, self.world, port, **self.options)
            loaded = self.source.load(0, self.world, dist.group.WORLD)
        except Exception as exc:  # a worker that failed first (its load) breaks rank 0's connections: its error
            cause = self._worker_error(5.0)  # is the cause to report, not "connection closed by peer"
            raise ModelLoadError(f"tensor-parallel {cause or f'rank 0: {type(exc).__name__}: {exc}'}") from exc
        use_graph_group(loaded.model, graph_group)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                kind, detail = conn.recv() if conn.poll(START_TIMEOUT_S) else ("late", "")
            except (EOFError, OSError):  # it exited; the watchdog may have read its error first
                kind, detail = "error", self.failure or f"rank {rank} exited during start-up"
            if kind == "late":
                raise ModelLoadError(f"tensor-parallel rank {rank} did not load within {START_TIMEOUT_S:.0f} s")
            if kind != "ready":
                raise ModelLoadError(f"tensor-parallel {detail}")
        return loaded

    def _worker_error(self, wait_s: float) -> str | None:
        """A worker's reported start-up error (or the watchdog's account of its exit) within `wait_s` seconds."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.failure:
                return self.failure.removeprefix("tensor-parallel ")
            for conn in self.conns:
                with suppress(Exception):
                    if conn.poll():
                        kind, detail = conn.recv()
                        if kind == "error":
                            return detail
            time.sleep(0.05)
        return None

    def send(self, message: tuple) -> None:
        """Hand a message to every worker (raises when one is gone)."""
        if self.failure:
            raise RuntimeError(self.failure)
        for conn in self.conns:
            conn.send(message)

    def _watch(self) -> None:
        """Wait for any worker to exit; outside `close`, that is a failure of the whole group."""
        by_sentinel = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, start=1)}
        done = wait(list(by_sentinel)) if by_sentinel else []
        if self.closing or not done:
            return
        rank, proc = by_sentinel[done[0]]
        detail = ""
        conn = self.conns[rank - 1]
        with suppress(Exception):
            while conn.poll():
                kind, text = conn.recv()
                detail = f": {text}" if kind == "error" else detail
        self.failure = f"tensor-parallel rank {rank} exited with code {proc.exitcode}{detail}"
        log.error("%s; the engine stops", self.failure)
        if self.on_failure is not None:
            self.on_failure(self.failure)
        if self.device == "cuda":
            _abort_collectives()
        self._end_workers(5.0)

    def _end_workers(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)

    def close(self, grace: float = 10.0, collectives_idle: bool = True) -> None:
        """Stop the workers (asked first, then terminated, then killed) and leave the process group."""
        self.closing = True
        for conn in self.conns:
            with suppress(Exception):
                conn.send(("stop", None))
        self._end_workers(grace)
        for conn in self.conns:
            with suppress(Exception):
                conn.close()
        if not collectives_idle and self.device == "cuda" and dist.is_initialized():
            _abort_collectives()  # rank 0's step is stuck in a collective: end it
        elif dist.is_initialized():
            _leave_group(bounded=self.device == "cuda")
