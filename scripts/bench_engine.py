"""Engine-only decode benchmark (no HTTP): how fast the inference loop itself runs, steered and not.

    python -m scripts.bench_engine                                   # embedded model on the CPU
    python -m scripts.bench_engine --arch qwen2.5-7b --tokenizer DIR # random weights on the GPU

For each batch size it submits that many rows at once (forced lengths, greedy), times the decode
phase, and prints tokens/s for unsteered rows, rows with one distinct vector each, and rows with
assistant-axis capture. `--profile` writes a torch profiler table of one steered batch-1 run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.model_loader import LoadedModel
from infrastructure.steering.spec import Capture, SteeringSpec, add_op
from scripts.bench_archs import ARCHS
from scripts.bench_setup import load


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="embedded", choices=["embedded", *ARCHS])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--rows", default=None, help="comma-separated batch sizes (GPU 1,8,64; CPU 1,8)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=None, help="GPU 128, CPU 32")
    p.add_argument(
        "--decode", default="auto", choices=["auto", "paged", "dynamic", "static", "graphs"], help="DECODE_MODE"
    )
    p.add_argument("--profile", type=Path, default=None, help="write a profiler table here")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.rows = [int(r) for r in (args.rows or ("1,8,64" if gpu else "1,8")).split(",")]
    args.new_tokens = args.new_tokens or (128 if gpu else 32)
    return args


def rows_for(loaded: LoadedModel, n: int, kind: str, args: argparse.Namespace) -> list[RowRequest]:
    hidden, layer = loaded.hidden_size, loaded.n_layers // 2
    gen = torch.Generator().manual_seed(0)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for _ in range(n):
        ids = tuple(int(t) for t in torch.randint(100, 20000, (args.prompt_tokens,), generator=gen))
        v = torch.randn(hidden, generator=gen)
        steering = SteeringSpec((add_op(layer, v / v.norm(), 1.0),)) if kind == "steered" else None
        captures = (Capture("axis", layer, v / v.norm()),) if kind == "capture" else ()
        rows.append(RowRequest(ids, sampling, steering, captures))
    return rows


async def timed(engine: PersonaEngine, rows: list[RowRequest]) -> tuple[float, float]:
    """(seconds to the first token of every row, seconds from there to the end)."""
    start = time.perf_counter()
    first_done = None
    seen = set()
    async for event in engine.submit(GenerationJob(rows)):
        row = getattr(event, "row", None)
        if row is not None and row not in seen:
            seen.add(row)
            if len(seen) == len(rows):
                first_done = time.perf_counter()
    end = time.perf_counter()
    return (first_done or end) - start, end - (first_done or end)


def graph_timing(engine: PersonaEngine, repeats: int = 50) -> str:
    """Per captured decode graph (largest length bucket): GPU time per replay (replays queued back to back)
    and the CPU time one replay call takes to launch: the split between kernel time and launch overhead."""
    lines = ["| graph (rows, columns, sites) | GPU ms per replay | CPU ms per launch |", "|---|---:|---:|"]
    steps = engine._batch._steps
    for (rows, span, layout), step in sorted(steps.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if step.graph is None or span != max(s for _, s, _ in steps):
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        launch = 0.0
        start.record()
        for _ in range(repeats):
            t0 = time.perf_counter()
            step.graph.replay()
            launch += time.perf_counter() - t0
        end.record()
        torch.cuda.synchronize()
        lines.append(f"| {rows}, {span}, {len(layout)} | {start.elapsed_time(end) / repeats:.2f} | "
                     f"{1000 * launch / repeats:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    loaded = load(args, Settings(_env_file=None, device=args.device))
    engine = PersonaEngine(loaded, max_batch_size=max(args.rows), max_queue=64, decode=args.decode)
    engine.start()
    assert engine.wait_ready(600), engine.broken
    print(
        f"{loaded.model_id} on {args.device} ({engine.decode_mode} decode), {args.prompt_tokens}-token prompts, "
        f"{args.new_tokens} new tokens"
    )
    print("| rows | kind | prefill s | decode tokens/s | ms per step |\n|---:|---|---:|---:|---:|")
    for n in args.rows:
        for kind in ("plain", "steered", "capture"):
            asyncio.run(timed(engine, rows_for(loaded, n, kind, args)))  # warm this shape
            prefill, decode = asyncio.run(timed(engine, rows_for(loaded, n, kind, args)))
            steps = args.new_tokens - 1
            print(f"| {n} | {kind} | {prefill:.3f} | {n * steps / decode:,.1f} | {1000 * decode / steps:.1f} |")
    if engine.decode_mode == "graphs":
        print(graph_timing(engine))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            asyncio.run(timed(engine, rows_for(loaded, 1, "steered", args)))
        args.profile.write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    engine.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
