"""Where a paged decode step's GPU time goes: kernel microbenchmarks and a profiled decode step.

    python -m scripts.profile_paged_step --arch qwen2.5-7b --tokenizer DIR    # GPU

1. The attention call alone on synthetic keys/values (Qwen2.5-7B heads): FlashAttention-2 varlen over
   gathered blocks (`flash`, the gather timed apart), the same kernel reading the pool through block
   tables (`flash_paged`), and `num_splits`; max |difference| between them.
2. The whole model's decode step as a CUDA graph for `flash` and `flash_paged`, two batches (64 rows at
   256 positions, as in W2; 63 × 129 + 1 × 6,001, as in W5), and a profiler table of the eager `flash`
   step grouped into gather (index kernels), attention, matrix multiplies and the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from app.settings import Settings
from infrastructure.engine.graphs import DecodeGraphs
from infrastructure.engine.runner import ModelRunner, Work
from scripts.bench_archs import ARCHS
from scripts.bench_setup import load
from scripts.check_paged_kernels import Rows, timed

FA = torch.ops.aten._flash_attention_forward


def cuda_ms(fn, repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def kernels(lengths: list[int], block: int, heads: int = 28, kv_heads: int = 4, d: int = 128) -> None:
    """Attention alone for one layer: gather + varlen vs block-table varlen (and num_splits)."""
    dev, dt = "cuda", torch.bfloat16
    per_row = [-(-n // block) for n in lengths]
    blocks = sum(per_row) + 8
    k_pool = torch.randn(blocks * block, kv_heads, d, device=dev, dtype=dt)
    v_pool = torch.randn_like(k_pool)
    perm = torch.randperm(blocks - 8, device=dev)  # rows' blocks scattered over the pool
    table = torch.zeros(len(lengths), max(per_row), dtype=torch.int32, device=dev)
    at = 0
    for i, n in enumerate(per_row):
        table[i, :n] = perm[at : at + n].int()
        at += n
    lens = torch.tensor(lengths, device=dev)
    slots = torch.cat(
        [
            (
                table[i, : -(-n // block)].long().repeat_interleave(block) * block
                + torch.arange(-(-n // block) * block, device=dev) % block
            )[:n]
            for i, n in enumerate(lengths)
        ]
    )
    q = torch.randn(len(lengths), heads, d, device=dev, dtype=dt)
    cu_q = torch.arange(len(lengths) + 1, device=dev, dtype=torch.int32)
    cu_k = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).int()
    mk = max(lengths)

    def gather():
        return k_pool[slots], v_pool[slots]

    k, v = gather()

    def packed(splits=None):
        extra = {} if splits is None else {"num_splits": splits}
        return FA(q, k, v, cu_q, cu_k, 1, mk, 0.0, True, False, **extra)[0]

    def paged(splits=None):
        kp, vp = k_pool.view(-1, block, kv_heads, d), v_pool.view(-1, block, kv_heads, d)
        extra = {} if splits is None else {"num_splits": splits}
        return FA(q, kp, vp, cu_q, cu_k, 1, mk, 0.0, True, False, block_table=table, **extra)[0]

    ref = packed()
    kv_mb = 2 * sum(lengths) * kv_heads * d * 2 / 1e6
    line = f"rows {len(lengths)}, keys {sum(lengths)} (max {mk}), block {block}, K+V {kv_mb:.1f} MB/layer:"
    line += f" gather {cuda_ms(gather):.3f} ms, flash {cuda_ms(packed):.3f} ms"
    for splits in (4, 16):
        try:
            line += f", flash num_splits={splits} {cuda_ms(lambda s=splits: packed(s)):.3f} ms"
        except Exception as exc:  # noqa: BLE001 - report what the build accepts
            line += f", num_splits={splits} refused ({str(exc)[:80]})"
    try:
        diff = (paged() - ref).abs().max().item()
        line += f", flash_paged {cuda_ms(paged):.3f} ms (max |Δ| {diff:.3g})"
        line += f", flash_paged num_splits=16 {cuda_ms(lambda: paged(16)):.3f} ms"
    except Exception as exc:  # noqa: BLE001
        line += f", flash_paged refused ({str(exc)[:120]})"
    print(line, flush=True)


def step_profile(runner: ModelRunner, works: list[Work], out: Path | None) -> None:
    """Profile the eager decode step: GPU ms per kernel group."""
    from torch.profiler import ProfilerActivity, profile

    runner.execute(works, {})
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner.execute(works, {})
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        us = e.device_time_total / 5
        if us <= 0:
            continue
        name = e.key.lower()
        kind = (
            "attention (flash)"
            if "flash" in name
            else "gather (index)"
            if "index" in name and "index_copy" not in name and "put" not in name
            else "matmul"
            if any(k in name for k in ("gemm", "nvjet", "cutlass", "sm90", "matmul"))
            else "other"
        )
        groups[kind] = groups.get(kind, 0.0) + us / 1000
        rows.append((us / 1000, e.count // 5, e.key[:90]))
    print("  eager step GPU ms by group: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(groups.items())), flush=True)
    for ms, n, key in sorted(rows, reverse=True)[:12]:
        print(f"    {ms:7.3f} ms  x{n:<5} {key}")
    if out is not None:
        out.write_text(prof.key_averages().table(sort_by="device_time_total", row_limit=40))


def model_steps(loaded, kernel: str, lengths: list[int], out: Path | None) -> tuple[float, torch.Tensor]:
    rows = Rows(lengths, 16)
    runner = ModelRunner(loaded.model, rows.blocks, 16, loaded.dtype, kernel, len(lengths), 1024)
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate(lengths):  # prompts in 2,048-token pieces
        ids = torch.randint(100, 20000, (n,), generator=gen).tolist()
        for s in range(0, n, 2048):
            part = ids[s : s + 2048]
            runner.execute([Work(part, s, rows.tables[i], [False] * len(part), False, i)], {})
    works = [Work([7], n, rows.tables[i], [False], True, i) for i, n in enumerate(lengths)]
    eager_ms, (eager, _) = timed(lambda: runner.execute(works, {}), 5, "cuda")
    graphs = DecodeGraphs(runner, len(lengths), rows.blocks * 16, min_seen=1)
    graph_ms, (logits, _) = timed(lambda: graphs.run(works, {}, ("p",)), 20, "cuda")
    diff = (logits - eager).abs().max().item()
    print(
        f"{kernel}: {len(lengths)} rows, {sum(lengths)} keys: eager {eager_ms:.2f} ms, graph {graph_ms:.2f} ms"
        f" (graph vs eager max |Δ logits| {diff:.3g})",
        flush=True,
    )
    if kernel == "flash":
        step_profile(runner, works, out)
    return graph_ms, logits.clone()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen2.5-7b", choices=list(ARCHS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=None, help="folder for the profiler tables")
    args = p.parse_args(argv)
    args.device = "cuda"
    print(torch.__version__, torch.cuda.get_device_name(0))
    print(FA.default._schema)
    w2, w5 = [256] * 64, [129] * 63 + [6001]
    with torch.inference_mode():
        for lengths in (w2, w5):
            for block in (16, 256):
                kernels(lengths, block)
        loaded = load(args, Settings(_env_file=None, device="cuda"))
        faster = []
        for name, lengths in (("w2", w2), ("w5", w5)):
            got = {}
            for kernel in ("flash", "flash_paged"):
                try:
                    out = args.out / f"profile_{name}.txt" if args.out else None
                    got[kernel] = model_steps(loaded, kernel, lengths, out)
                except Exception as exc:  # noqa: BLE001 - a kernel the build refuses is a result too
                    print(f"{kernel} on {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                torch.cuda.empty_cache()
            if len(got) == 2:
                diff = (got["flash"][1] - got["flash_paged"][1]).abs().max().item()
                print(f"{name}: flash_paged vs flash graph logits max |Δ| {diff:.3g}", flush=True)
                faster.append(got["flash_paged"][0] < got["flash"][0] and diff < 1.0)
    print("best:", "flash_paged" if faster and all(faster) else "flash")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
