"""Sweep gptqmodel's AWQ Triton launch plans on this GPU for real layer shapes; keep the best (issue 15).

    python -m scripts.tune_awq_tiles --archs llama-3.3-70b,qwen2.5-7b --out tiles.json \
        --write-table infrastructure/quant_tiles.json                                   # GPU: the shipped table
    python -m scripts.tune_awq_tiles --fake --archs qwen2.5-7b --out /tmp/t.json --write-table /tmp/table.json

For each arch's distinct 4-bit layer shapes (q, k/v, o, gate/up, down: N out x K in, group 128) and decode
batches of 1 and 64 rows, candidate plans (block M/N/K, split-K, warps, stages; the library's validator
decides which are legal) are timed as CUDA graphs of the library's own `awq_gemm_triton` call (its output
allocation and fp32 -> fp16 cast included, as in a decode step), cycling through enough weight copies that
they stream from HBM rather than L2. The first shapes of each row count get the whole grid; the others the
best plans found so far plus the library's default plan, so the sweep fits a short budget. Kernels compile
in parallel worker processes first, within --compile-timeout-s (Triton's disk cache then serves the timing
process); --budget-s bounds the timing after that. Each shape also gets the library default's time, fp16
cuBLAS on the same shape (what bf16/fp16 weights cost), and the chosen plan's largest difference from the
default plan's output. The report and the table are written after every shape (a cut run keeps what it
measured); last, the chosen plans are compiled at the other M specialisations the engine's decode buckets hit.
--fake replaces the GPU with a cost model: a CPU check of the flow and of the files written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROWS = (1, 64)
GROUP = 128
L2_BYTES = 200 * 2**20  # weight copies cycled per timing: more than the H200's 50 MB L2 several times over
BASELINE = {"path": "fused", "block_size_m": 32, "block_size_n": 32, "block_size_k": 32, "split_k_iters": 8}
FIELDS = ("block_size_m", "block_size_n", "block_size_k", "split_k_iters", "num_warps", "num_stages")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="llama-3.3-70b,qwen2.5-7b")
    p.add_argument("--out", type=Path, required=True, help="the sweep's report (JSON)")
    p.add_argument("--write-table", type=Path, default=None, help="merge the chosen plans into this table")
    p.add_argument("--budget-s", type=float, default=60.0, help="timing: no new candidate after this (compile apart)")
    p.add_argument("--top", type=int, default=10, help="plans carried from the full sweeps to the other shapes")
    p.add_argument("--reps", type=int, default=64, help="GEMMs per timed CUDA graph (each on its own weight copy)")
    p.add_argument("--compile-timeout-s", type=float, default=30.0, help="stop the parallel compile after this")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--fake", action="store_true", help="no GPU: a cost model instead of timings")
    return p.parse_args(argv)


def layer_shapes(arch: str) -> dict[str, tuple[int, int]]:
    """The arch's distinct 4-bit Linear shapes as (N out, K in)."""
    from scripts.bench_archs import arch_config, projection_widths

    c = arch_config(arch, 1)
    q, kv = projection_widths(c)
    shapes = {"q": (q, c.hidden_size), "kv": (kv, c.hidden_size), "o": (c.hidden_size, q)}
    return shapes | {"gate_up": (c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size)}


def grid(rows: int) -> list[dict]:
    """The candidate plans for a row count (one 16-row tile for single rows; wider M tiles for 64)."""
    if rows <= 16:
        values = itertools.product((16,), (64, 128), (32, 64), (4, 8, 16, 32), (2, 4), (2, 4))
    else:
        values = itertools.product((32, 64), (64, 128), (64,), (1, 2, 4, 8), (4, 8), (2, 3))
    return [{"path": "fused"} | dict(zip(FIELDS, v, strict=True)) for v in values]


def plan_id(plan: dict) -> str:
    return "-".join(str(plan.get(f)) for f in FIELDS)


def validator(fake: bool):
    if fake:
        return lambda **kwargs: True
    from gptqmodel.quantization.awq.modules.triton.scheduler import valid_fused_config

    return valid_fused_config


def legal(plan: dict, rows: int, n: int, k: int, valid) -> bool:
    fields = {f: plan.get(f) for f in FIELDS}
    return valid(M=rows, N=n, K=k, group_size=GROUP, **fields)


# ---- the GPU side -------------------------------------------------------------------------------------


def awq_tensors(rows: int, n: int, k: int, copies: int, device: str = "cuda"):
    """Random packed AWQ weights (copies of one shape) and an input, on the GPU."""
    import torch

    x = torch.randn(rows, k, dtype=torch.float16, device=device)
    weights = []
    for _ in range(copies):
        qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device)
        qzeros = torch.randint(-(2**31), 2**31 - 1, (k // GROUP, n // 8), dtype=torch.int32, device=device)
        scales = torch.rand(k // GROUP, n, dtype=torch.float16, device=device) * 1e-3
        weights.append((qweight, scales, qzeros))
    return x, weights


def launch(x, weight, plan: dict):
    from gptqmodel.quantization.awq.modules.triton.gemm import awq_gemm_triton

    qweight, scales, qzeros = weight
    kwargs = {f: plan[f] for f in FIELDS if plan.get(f) is not None}
    return awq_gemm_triton(x, qweight, scales, qzeros, output_dtype=x.dtype, **kwargs)


def compile_worker(jobs: list[tuple[int, dict]]) -> list[tuple[str, str | None]]:
    """Worker process: launch each (rows, plan) once on small tensors of the same specialisation."""
    import torch

    out = []
    small = {rows: awq_tensors(rows, 256, 1024, 1) for rows in {r for r, _ in jobs}}
    for rows, plan in jobs:
        x, weights = small[rows]
        try:
            launch(x, weights[0], plan)
            torch.cuda.synchronize()
            out.append((f"{rows}:{plan_id(plan)}", None))
        except Exception as exc:  # out of shared memory for this tile, say: not a candidate
            out.append((f"{rows}:{plan_id(plan)}", f"{type(exc).__name__}: {exc}"[:200]))
    return out


def precompile(jobs: list[tuple[int, dict]], workers: int, timeout: float) -> dict:
    """Compile in `workers` processes; past `timeout` the rest compile on first use in the timing process."""
    started = time.perf_counter()
    chunks = [jobs[i::workers] for i in range(workers)]
    results, finished = [], True
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = pool.map_async(compile_worker, [c for c in chunks if c])
        try:
            results = [r for part in pending.get(timeout) for r in part]
        except multiprocessing.TimeoutError:
            finished = False
    failed = {key: error for key, error in results if error}
    return {"jobs": len(jobs), "finished": finished, "failed": failed, "seconds": time.perf_counter() - started}


def time_graph(fn, reps: int) -> float:
    """Microseconds per call of fn(i), captured `reps` times in one CUDA graph and replayed."""
    import torch

    fn(0)
    torch.cuda.synchronize()
    # capture_begin/end on a side stream rather than `with torch.cuda.graph()`, whose entry runs gc.collect():
    # a fraction of a second per candidate with transformers and gptqmodel imported
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        for i in range(reps):
            fn(i)
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    del graph
    return best


class GpuTimer:
    def __init__(self, reps: int):
        self.reps, self.cache = reps, None

    def prepare(self, rows: int, n: int, k: int) -> None:
        import torch

        self.cache = None
        torch.cuda.empty_cache()
        per_copy = k * n // 2 + (k // GROUP) * n * 3 // 2
        copies = max(1, min(self.reps, L2_BYTES // per_copy))
        self.x, self.weights = awq_tensors(rows, n, k, copies)
        dense = max(1, min(self.reps, L2_BYTES // (2 * n * k)))
        self.dense = [torch.randn(n, k, dtype=torch.float16, device="cuda") for _ in range(dense)]
        self.bytes = per_copy

    def plan_us(self, plan: dict) -> float:
        return time_graph(lambda i: launch(self.x, self.weights[i % len(self.weights)], plan), self.reps)

    def fp16_us(self) -> float:
        import torch

        return time_graph(lambda i: torch.matmul(self.x, self.dense[i % len(self.dense)].t()), self.reps)

    def max_rel_diff(self, plan: dict) -> float:
        a, b = launch(self.x, self.weights[0], plan).float(), launch(self.x, self.weights[0], BASELINE).float()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class FakeTimer:
    """A cost model: HBM time of the packed weights at an efficiency that grows with the grid's CTAs."""

    def prepare(self, rows: int, n: int, k: int) -> None:
        self.rows, self.n, self.k = rows, n, k
        self.bytes = k * n // 2 + (k // GROUP) * n * 3 // 2

    def plan_us(self, plan: dict) -> float:
        ctas = -(-self.rows // plan["block_size_m"]) * -(-self.n // plan["block_size_n"]) * plan["split_k_iters"]
        efficiency = min(1.0, ctas / 1056) * (plan["block_size_n"] * plan["block_size_k"] / 8192) ** 0.25
        return self.bytes / (4.3e6 * max(efficiency, 0.01)) + 2.0 * (plan["split_k_iters"] > 1)

    def fp16_us(self) -> float:
        return 2 * self.k * self.n / 4.3e6

    def max_rel_diff(self, plan: dict) -> float:
        return 0.0


# ---- the sweep ----------------------------------------------------------------------------------------


def sweep(args: argparse.Namespace, save) -> dict:
    """Time the candidates; `save(report)` after every shape, so a sweep cut short keeps what it measured."""
    valid = validator(args.fake)
    shapes = {arch: layer_shapes(arch) for arch in args.archs.split(",")}
    order = [(a, name, nk) for a, s in shapes.items() for name, nk in s.items()]
    # the whole grid on the largest and the narrowest shape of the first arch, the leaders elsewhere
    first = shapes[order[0][0]]
    full = {max(first, key=lambda s: first[s][0] * first[s][1]), min(first, key=lambda s: first[s][0])}
    report: dict = {"command": " ".join(sys.argv), "fake": args.fake, "shapes": {}}
    if not args.fake:
        import torch
        import triton

        report |= {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
        jobs = [(rows, plan) for rows in ROWS for plan in [BASELINE, *grid(rows)]]
        report["compile"] = precompile(jobs, args.workers, args.compile_timeout_s)
        print(f"[tune] compiled {len(jobs)} kernels in {report['compile']['seconds']:.1f} s", flush=True)
    failed = set(report.get("compile", {}).get("failed", {}))
    started = time.perf_counter()  # the timing budget: compiling has its own (--compile-timeout-s)
    timer = FakeTimer() if args.fake else GpuTimer(args.reps)
    scores: dict[int, Counter] = {rows: Counter() for rows in ROWS}
    for phase in ("full", "rest"):
        for arch, name, (n, k) in order:
            if (phase == "full") != (arch == order[0][0] and name in full):
                continue
            entry = report["shapes"].setdefault(arch, {}).setdefault(name, {"N": n, "K": k})
            for rows in ROWS:
                began = time.perf_counter()
                timer.prepare(rows, n, k)
                if phase == "full":
                    plans = grid(rows)
                else:
                    leaders = [p for p, _ in scores[rows].most_common(args.top)]
                    plans = [p for p in grid(rows) if plan_id(p) in leaders]
                plans = [p for p in plans if legal(p, rows, n, k, valid) and f"{rows}:{plan_id(p)}" not in failed]
                timings = {"baseline": timer.plan_us(BASELINE), "fp16_cublas": timer.fp16_us()}
                for plan in plans:
                    if time.perf_counter() - started > args.budget_s and len(timings) > 3:
                        break
                    try:
                        timings[plan_id(plan)] = timer.plan_us(plan)
                    except Exception as exc:  # a tile the GPU cannot run (shared memory, say): not a candidate
                        failed.add(f"{rows}:{plan_id(plan)}")
                        print(f"[tune] {plan_id(plan)} at M={rows}: {type(exc).__name__}: {exc}"[:300], flush=True)
                ranked = sorted((us, key) for key, us in timings.items() if key != "fp16_cublas")
                for place, (_, key) in enumerate(ranked[: args.top]):
                    scores[rows][key] += args.top - place
                best = {"baseline": BASELINE} | {plan_id(p): p for p in plans}
                best = best[ranked[0][1]]
                entry[str(rows)] = {
                    "plan": best,
                    "us": ranked[0][0],
                    "weight_gb_per_s": timer.bytes / ranked[0][0] / 1e3,
                    "baseline_us": timings["baseline"],
                    "fp16_cublas_us": timings["fp16_cublas"],
                    "tried": len(timings) - 2,
                    "max_rel_diff_vs_baseline": timer.max_rel_diff(best),
                }
                entry[str(rows)]["seconds"] = time.perf_counter() - began
                report["seconds"] = time.perf_counter() - started
                save(report)
                print(f"[tune] {arch} {name} N={n} K={k} M={rows}: {json.dumps(entry[str(rows)])}", flush=True)
    if not args.fake:  # the chosen plans at the other M specialisations the decode buckets hit (2, 16, 24 rows)
        # (Triton's disk cache then serves the server's warm-up; the report and table are already written)
        chosen = {(rows, plan_id(e[r]["plan"])): e[r]["plan"] for a in report["shapes"].values() for e in a.values()
                  for r, rows in (("1", 2), ("1", 16), ("64", 24))}  # fmt: skip
        jobs = [(rows, plan) for (rows, _), plan in chosen.items()]
        report["warm"] = precompile(jobs, min(args.workers, len(jobs)), args.compile_timeout_s)
        save(report)
    return report


def table_from(report: dict) -> dict:
    """The device's entry of quant_tiles.json: best plans per shape, and as the default for other shapes the
    plans most shapes chose (none where no plan won a majority: other shapes keep the library's policy)."""
    shapes, default = {}, {}
    for arch in report["shapes"].values():
        for entry in arch.values():
            shapes[f"{entry['N']}x{entry['K']}"] = {str(r): entry[str(r)]["plan"] for r in ROWS if str(r) in entry}
    for rows in ROWS:
        counts = Counter(json.dumps(s[str(rows)], sort_keys=True) for s in shapes.values() if str(rows) in s)
        plan, count = counts.most_common(1)[0] if counts else (None, 0)
        if count * 2 > sum(counts.values()):  # a plan most shapes chose: used for shapes not swept
            default[str(rows)] = json.loads(plan)
    entry = {"measured": f"{time.strftime('%Y-%m-%d')}: {report['command']}", "shapes": shapes}
    return entry | ({"default": default} if len(default) == len(ROWS) else {})


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # as the loader pins it

    def save(report: dict) -> None:
        args.out.write_text(json.dumps(report, indent=2))
        if args.write_table and report["shapes"]:
            table = json.loads(args.write_table.read_text()) if args.write_table.is_file() else {}
            device = "fake" if args.fake else report["device"]
            table.setdefault("devices", {})[device] = table_from(report)
            args.write_table.write_text(json.dumps(table, indent=1) + "\n")

    report = sweep(args, save)
    print(f"[tune] done: {report.get('seconds', 0):.1f} s of timing", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
