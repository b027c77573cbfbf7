"""Tensor-parallel CUDA-graph smoke test on 2 GPUs (issue 16): which all-reduce a graph can hold, bounded.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python -m scripts.smoke_tp_capture --tokenizer tok --out DIR

Each stage runs in its own child under a timeout and writes its own log (a rank of the `comm` stage, and any
capture of the `engine` stages, dumps every thread's stack when it overruns, so a hang shows where each rank
stands):
- `comm`: two ranks: peer access, NCCL (INFO: the transport it picked), eager all-reduce latency, symmetric
  memory all-reduce eager and in a CUDA graph (value checked), then ProcessGroupNCCL's all-reduce in a graph;
- `engine-<mode>`: the engine on 2 GPUs, random Qwen2.5-7B shape cut to 2 layers (bf16), one row then three
  (rows buckets 1, 2, 4) with TENSOR_PARALLEL_GRAPH_REDUCE=<mode>: greedy ids, graph captures and replays, tok/s.
  `off` (eager) is the reference the graph modes must equal (two ranks sum in one order: bit-identical).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 3584


def _say(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def _timed(fn, n: int) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def comm_rank(rank: int, port: int, out: str, limit: float) -> None:
    """One rank of the `comm` stage (stdout and stderr, NCCL's own lines included, go to its log)."""
    os.environ.setdefault("NCCL_DEBUG", "INFO")  # NCCL's transport choice (P2P, SHM, NET) in the log
    os.environ.setdefault("NCCL_DEBUG_SUBSYS", "INIT")
    log = open(os.path.join(out, f"comm_rank{rank}.log"), "w")  # noqa: SIM115 - the process's whole life
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.dump_traceback_later(limit, exit=True)
    import torch
    import torch.distributed as dist

    from infrastructure.engine.tp_comm import SymmetricAllReduce

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2)
    _say("peer access", torch.cuda.can_device_access_peer(rank, 1 - rank), torch.cuda.get_device_name(rank))
    x = torch.ones(1, HIDDEN, dtype=torch.bfloat16, device="cuda")
    dist.all_reduce(x)
    _say("nccl eager all-reduce ok:", float(x[0, 0]) == 2)
    for rows in (1, 64):
        y = torch.ones(rows, HIDDEN, dtype=torch.bfloat16, device="cuda")
        _say(f"nccl eager all-reduce [{rows},{HIDDEN}] bf16: {_timed(lambda i, y=y: dist.all_reduce(y), 200):.1f} us")
    try:
        reducer = SymmetricAllReduce(dist.group.WORLD, 64 * HIDDEN, torch.bfloat16, torch.device("cuda", rank))
        ok = float(reducer(torch.ones(1, HIDDEN, dtype=torch.bfloat16, device="cuda"), 0)[0, 0]) == 2
        _say("symm_mem eager all-reduce ok:", ok)
        for rows in (1, 64):
            y = torch.ones(rows, HIDDEN, dtype=torch.bfloat16, device="cuda")
            _say(f"symm_mem eager [{rows},{HIDDEN}]: {_timed(lambda i, y=y: reducer(y, i % 2), 200):.1f} us")
        z = torch.full((4, HIDDEN), rank + 1.0, dtype=torch.bfloat16, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            reducer(z, 0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        _say("symm_mem: capturing 16 all-reduces")
        with torch.cuda.graph(graph):
            acc = z
            for i in range(16):
                acc = reducer(acc * 0.5, i % 2)  # (a + b) / 2 summed: stays 1.5 every time
        graph.replay()
        torch.cuda.synchronize()
        _say("symm_mem graph value ok:", float(acc[0, 0]) == 1.5, float(acc[0, 0]))
        _say(f"symm_mem graph: {_timed(lambda i: graph.replay(), 50) / 16:.1f} us per all-reduce")
    except Exception as exc:
        _say(f"symm_mem FAILED: {type(exc).__name__}: {exc}")
    w = torch.ones(4, HIDDEN, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            dist.all_reduce(w)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _say("nccl: capturing 16 all-reduces (thread_local)")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(16):
            w.mul_(0.5)
            dist.all_reduce(w)
    _say("nccl: captured; replaying")
    w.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    _say("nccl graph value ok:", float(w[0, 0]) == 1.0, float(w[0, 0]))
    _say(f"nccl graph: {_timed(lambda i: graph.replay(), 50) / 16:.1f} us per all-reduce")
    log.flush()
    os._exit(0)


def stage_comm(out: Path, limit: float) -> None:
    import torch.multiprocessing as mp

    from infrastructure.engine.tp_workers import _free_port

    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=comm_rank, args=(r, port, str(out), limit - 2)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(limit)
    for p in procs:
        if p.is_alive():
            p.kill()
    print("exit codes", [p.exitcode for p in procs], flush=True)


def stage_engine(out: Path, mode: str, tokenizer: str, limit: float, device: str = "cuda") -> None:
    import asyncio
    import logging

    import torch

    from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
    from infrastructure.engine.tensor_parallel import start_tensor_parallel
    from scripts.check_tensor_parallel import RandomShardSource

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from infrastructure.engine.tp_workers import dump_stacks_from_env

    if not dump_stacks_from_env():  # TENSOR_PARALLEL_STACK_DUMP_S: every rank's stacks every N s instead
        faulthandler.dump_traceback_later(limit - 10, exit=True)  # before the parent's timeout (imports took some)
    dtype = "bfloat16" if device == "cuda" else "float32"  # the CPU: a flow check of this script (gloo)
    source = RandomShardSource("qwen2.5-7b", 2, tokenizer, dtype, device, tiny=device == "cpu")
    options = dict(max_batch_size=4, max_queue=16, kv_cache_tokens=4096, graph_reduce=mode)
    started = time.perf_counter()
    loaded, engine = start_tensor_parallel(source, 2, device, min(20.0, limit / 2), **options)
    engine.start()
    result: dict = {"mode": mode}
    try:
        if not engine.wait_ready(limit):
            raise RuntimeError(f"engine did not start: {engine.broken}")
        result["start_s"], result["mode_in_force"] = time.perf_counter() - started, engine.graph_reduce
        greedy = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
        gen = torch.Generator().manual_seed(5)
        prompts = [tuple(torch.randint(100, 20000, (24,), generator=gen).tolist()) for _ in range(3)]
        for rows in ([prompts[0]], prompts):
            begun = time.perf_counter()
            done = asyncio.run(engine.collect(GenerationJob([RowRequest(p, greedy) for p in rows])))
            wall = time.perf_counter() - begun
            result[f"rows{len(rows)}"] = {"ids": [f.token_ids for f in done], "tok_s": len(rows) * 32 / wall}
        from infrastructure.engine.tp_shard import RowParallelLinear

        rows = [m for m in loaded.model.modules() if isinstance(m, RowParallelLinear)]
        result["fp32_partials"] = bool(rows) and all(m.fp32_partials for m in rows)
        graphs = engine._graphs
        result["captures"] = graphs.captures if graphs else 0
        result["replays"] = graphs.replays if graphs else 0
    finally:
        engine.stop(10)
    (out / f"engine-{mode}.json").write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", default="tok")
    p.add_argument("--stage", default=None, help="(internal) run one stage")
    p.add_argument("--mode", default="off")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a flow check of the engine stages")
    p.add_argument("--limit", type=float, default=25.0)
    p.add_argument("--stages", default="comm,off,symm_mem,nccl", help="stages in order (engine modes by name)")
    p.add_argument("--stage-limit", type=float, default=40.0, help="seconds per stage at most")
    p.add_argument("--budget", type=float, default=100.0, help="seconds for every stage together")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "comm":
        stage_comm(args.out, args.limit)
        return 0
    if args.stage == "engine":
        stage_engine(args.out, args.mode, args.tokenizer, args.limit, args.device)
        return 0
    deadline = time.monotonic() + args.budget
    for stage in args.stages.split(","):
        left = min(args.stage_limit, deadline - time.monotonic())
        if left < 8:
            print(f"{stage}: skipped (budget)", flush=True)
            continue
        kind = ["--stage", "comm"] if stage == "comm" else ["--stage", "engine", "--mode", stage]
        command = [sys.executable, "-m", "scripts.smoke_tp_capture", *kind, "--limit", str(left - 3)]
        command += ["--out", str(args.out), "--tokenizer", args.tokenizer, "--device", args.device]
        with (args.out / f"{stage}.log").open("w") as fh:
            try:
                done = subprocess.run(command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=left)
                print(f"{stage}: exit {done.returncode}", flush=True)
            except subprocess.TimeoutExpired:
                print(f"{stage}: TIMED OUT after {left:.0f} s", flush=True)
    results = {f.stem.removeprefix("engine-"): json.loads(f.read_text()) for f in args.out.glob("engine-*.json")}
    reference = results.get("off")
    for mode, r in results.items():
        same = {k: r[k]["ids"] == reference[k]["ids"] for k in ("rows1", "rows3")} if reference else {}
        print(
            f"{mode}: in force {r['mode_in_force']}, fp32 partials {r.get('fp32_partials')}, {r['captures']} "
            f"captures, {r['replays']} replays, tok/s {r['rows1']['tok_s']:.0f} / {r['rows3']['tok_s']:.0f}, "
            f"greedy ids equal to eager TP: {same}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
