"""The fused, compiled decode step (issue 14) against the eager one, in one process on one model:

    python -m scripts.bench_fused --arch qwen2.5-1.5b --tokenizer DIR --agreement --restart --json out.json

1. Decode step as a CUDA graph, GPU ms per replay, eager transformers layers (COMPILE=off): 64 rows × 256
   positions (W2's shape) and 1 row (W1's), against the weight-read bound (weight bytes ÷ copy bandwidth).
2. `--agreement`: 64 greedy rows × 256 new tokens through the engine, each steered by its own vector,
   eager (COMPILE=off), then the same with COMPILE=on on the same model (fused in place): rows identical,
   tokens equal, where rows first diverge; and how many graphs dynamo compiled while serving them.
3. Start-up with COMPILE=on: fuse + compile + capture of the rows buckets, cold (an empty cache dir);
   `--restart` runs the start-up again in a fresh process on the same cache dir (cached).
4. The same step timings on the fused, compiled model, and a profile of its eager step by kernel group.
Every number goes to the JSON file; a short table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from app.settings import Settings
from infrastructure.engine import compiled_step
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.graphs import DecodeGraphs
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.engine.runner import ModelRunner, Work
from infrastructure.steering.spec import SteeringSpec, add_op
from scripts.bench_archs import ARCHS, copy_bandwidth, weight_bytes
from scripts.bench_setup import load
from scripts.check_paged_kernels import Rows, timed


def step_ms(loaded, lengths: list[int], device: str) -> tuple[float, torch.Tensor]:
    """GPU ms per replay of the decode-step graph (rows at `lengths` positions) and its logits."""
    rows = Rows(lengths, 16)
    half = loaded.dtype in (torch.bfloat16, torch.float16)
    kernel = "rows" if device != "cuda" else "flash" if half else "grouped"  # the engine's auto choice
    runner = ModelRunner(loaded.model, rows.blocks, 16, loaded.dtype, kernel, len(lengths), 1024)
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate(lengths):
        ids = torch.randint(100, 20000, (n,), generator=gen).tolist()
        runner.execute([Work(ids, 0, rows.tables[i], [False] * n, False, i)], {})
    works = [Work([7], n, rows.tables[i], [False], True, i) for i, n in enumerate(lengths)]
    if device != "cuda":
        return timed(lambda: runner.execute(works, {})[0], 2, device)
    graphs = DecodeGraphs(runner, len(lengths), rows.blocks * 16, min_seen=1)
    ms, (logits, _) = timed(lambda: graphs.run(works, {}, ("p",)), 30, device)
    return ms, logits.clone()


def kernel_groups(loaded, lengths: list[int]) -> dict:
    """GPU ms of one eager step by kernel group, and the number of kernels (torch.profiler, 3 steps)."""
    from torch.profiler import ProfilerActivity, profile

    rows = Rows(lengths, 16)
    runner = ModelRunner(loaded.model, rows.blocks, 16, loaded.dtype, "flash", len(lengths), 1024)
    works = [Work([7], n, rows.tables[i], [False], True, i) for i, n in enumerate(lengths)]
    runner.execute(works, {})
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.execute(works, {})
        torch.cuda.synchronize()
    groups: dict = {"kernels": 0}
    top = []
    for e in prof.key_averages():
        if e.device_time_total <= 0:
            continue
        top.append((round(e.device_time_total / 3000, 4), e.count // 3, e.key[:80]))
        name = e.key.lower()
        kind = "attention" if "flash" in name else "matmul" if any(
            k in name for k in ("gemm", "nvjet", "cutlass", "sm90", "matmul", "mm")) else "triton (fused)" if (
            "triton" in name) else "other"  # fmt: skip
        groups[kind] = groups.get(kind, 0.0) + e.device_time_total / 3000
        groups["kernels"] += e.count // 3
    groups["top"] = sorted(top, reverse=True)[:16]  # (ms per step, launches per step, kernel)
    return groups


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def margins(logits: torch.Tensor) -> dict:
    """How close greedy decisions are: the top-1 minus top-2 logit per row (random weights: near ties)."""
    top = logits.float().topk(2, dim=-1).values
    gap = (top[:, 0] - top[:, 1]).sort().values
    return {
        "top2_gap_median": gap[len(gap) // 2].item(),
        "top2_gap_min": gap[0].item(),
        "logit_std": logits.std().item(),
    }


def prompt_ids(tokenizer, n: int, seed: int) -> list[int]:
    words = "the city water system runs from the reservoir through pumps and pipes to every tap".split()
    text = " ".join(words[(seed + i) % len(words)] for i in range(n))
    return tokenizer(text)["input_ids"][:n]


def generate(engine: PersonaEngine, rows: int, new: int, hidden: int, layer: int) -> list[list[int]]:
    """Greedy rows, each steered by its own unit vector × 4 at `layer`, EOS ignored."""
    import asyncio

    async def run() -> list[list[int]]:
        jobs = []
        for r in range(rows):
            v = torch.randn(hidden, generator=torch.Generator().manual_seed(r))
            spec = SteeringSpec((add_op(layer, v / v.norm(), 4.0),))
            sampling = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
            jobs.append(GenerationJob([RowRequest(tuple(prompt_ids(engine.tokenizer, 128, r)), sampling, spec)]))
        done = await asyncio.gather(*(engine.collect(j) for j in jobs))
        return [d[0].token_ids for d in done]

    return asyncio.run(run())


def start(loaded, compile: str, rows: int, cache_dir: str | None) -> tuple[PersonaEngine, float]:
    started = time.perf_counter()
    engine = PersonaEngine(
        loaded, max_batch_size=rows, kv_cache_tokens=rows * 512 + 8192, compile=compile, compile_cache_dir=cache_dir
    )
    engine.start()
    if not engine.wait_ready(900):
        raise RuntimeError(f"engine did not start: {engine.broken}")
    return engine, time.perf_counter() - started


def agreement(eager: list[list[int]], fused: list[list[int]]) -> dict:
    first = []
    for a, b in zip(eager, fused):
        diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        first.append(diverge)
    total = sum(len(a) for a in eager)
    return {
        "rows": len(eager),
        "rows_identical": sum(a == b for a, b in zip(eager, fused)),
        "tokens_before_first_divergence": sum(first) / total,
        "first_divergence_positions": sorted(f for f in first if f < len(eager[0])),
    }


def compiles() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def startup_only(args) -> dict:
    loaded = load(args, Settings(_env_file=None, device=args.device, model_dtype=args.dtype or "auto"))
    before = compiles()
    engine, seconds = start(loaded, "on", args.rows, args.cache_dir)
    engine.stop()
    return {"startup_s": seconds, "warmup_s": engine.warmup_seconds, "graphs_compiled": compiles() - before}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen2.5-1.5b", choices=["embedded", *ARCHS])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--agreement", action="store_true", help="64 greedy steered rows, eager vs compiled")
    p.add_argument("--reference", action="store_true", help="also an fp32 copy of the weights: both vs it")
    p.add_argument("--restart", action="store_true", help="time a second start-up in a fresh process (cached)")
    p.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help="Inductor cache dir (default: a fresh folder under /tmp)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a quick CPU flow check)")
    p.add_argument("--json", type=Path, default=Path("test-artifacts/bench_fused.json"))
    args = p.parse_args(argv)
    args.cache_dir = args.cache_dir or f"/tmp/inductor-{os.getpid()}"
    compiled_step.BACKEND = args.backend
    if args.startup_only:
        print("STARTUP " + json.dumps(startup_only(args)), flush=True)
        return 0
    gpu = args.device == "cuda"
    out: dict = {"arch": args.arch, "layers": args.layers, "torch": torch.__version__}
    with torch.inference_mode():
        loaded = load(args, Settings(_env_file=None, device=args.device, model_dtype=args.dtype or "auto"))
        out["weight_gb"] = weight_bytes(loaded.model) / 1e9
        bandwidth = copy_bandwidth(args.device)
        out["copy_tb_s"] = bandwidth / 1e12 if bandwidth else None
        out["weight_read_bound_ms"] = weight_bytes(loaded.model) / bandwidth * 1e3 if bandwidth else None
        wide, one = [args.positions] * args.rows, [args.positions]
        reference = None  # the same weights in fp32, unfused: what exact arithmetic would decode
        if args.reference:
            reference = replace(loaded, model=copy.deepcopy(loaded.model).float(), dtype=torch.float32)
        out["eager_step_ms"], eager_logits = step_ms(loaded, wide, args.device)
        if reference is not None:
            ref_logits = step_ms(reference, wide, args.device)[1]
            out["reference"] = {"eager_rel_err": rel_err(eager_logits, ref_logits)} | margins(ref_logits)
        out["eager_step_1row_ms"], _ = step_ms(loaded, one, args.device)
        if gpu:
            out["eager_groups"] = kernel_groups(loaded, wide)
        print(json.dumps(out), flush=True)
    hidden, layer = loaded.hidden_size, loaded.n_layers // 2
    if args.agreement:
        engine, _ = start(loaded, "off", args.rows, None)
        eager_rows = generate(engine, args.rows, args.new_tokens, hidden, layer)
        engine.stop()
        if reference is not None:
            engine, _ = start(reference, "off", args.rows, None)
            ref_rows = generate(engine, args.rows, args.new_tokens, hidden, layer)
            engine.stop()
            out["reference"]["agreement_eager_vs_fp32"] = agreement(ref_rows, eager_rows)
    before = compiles()
    engine, seconds = start(loaded, "on", args.rows, args.cache_dir)
    out |= {"cold_startup_s": seconds, "cold_warmup_s": engine.warmup_seconds, "startup_graphs": compiles() - before}
    if args.agreement:
        before = compiles()
        fused_rows = generate(engine, args.rows, args.new_tokens, hidden, layer)
        out["graphs_compiled_while_serving_64_new_vectors"] = compiles() - before
        out["agreement"] = agreement(eager_rows, fused_rows)
        if reference is not None:
            out["reference"]["agreement_fused_vs_fp32"] = agreement(ref_rows, fused_rows)
    engine.stop()
    with torch.inference_mode():
        out["fused_step_ms"], fused_logits = step_ms(loaded, wide, args.device)
        out["fused_step_1row_ms"], _ = step_ms(loaded, one, args.device)
        out["step_logits_max_abs_diff"] = (fused_logits - eager_logits).abs().max().item()
        out["step_logits_rel_err_fused_vs_eager"] = rel_err(fused_logits, eager_logits)
        if reference is not None:
            out["reference"]["fused_rel_err"] = rel_err(fused_logits, ref_logits)
        if gpu:
            out["fused_groups"] = kernel_groups(loaded, wide)
    if args.restart:
        cmd = [sys.executable, "-m", "scripts.bench_fused", "--startup-only", "--arch", args.arch, "--rows"]
        cmd += [str(args.rows), "--cache-dir", args.cache_dir, "--device", args.device]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        cmd += ["--tokenizer", str(args.tokenizer)] if args.tokenizer else []
        cmd += ["--backend", args.backend] + (["--dtype", args.dtype] if args.dtype else [])
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        line = next((s for s in run.stdout.splitlines() if s.startswith("STARTUP ")), None)
        out["cached_restart"] = json.loads(line[8:]) if line else {"error": run.stderr[-2000:]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
