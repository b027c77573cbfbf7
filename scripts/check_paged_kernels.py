"""Which paged attention kernel? Each one on the same steps, checked against per-row SDPA and timed.

    python -m scripts.check_paged_kernels --arch qwen2.5-7b --tokenizer DIR     # GPU, bf16
    pipenv run python -m scripts.check_paged_kernels --rows 4 --long 64        # CPU, tiny

Kernels (infrastructure/engine/paged_attention.py): `rows` (one SDPA call per row over its gathered
blocks), `grouped` (decoding rows in one SDPA call with a block-diagonal mask), `flash` (PyTorch's
FlashAttention-2 variable-length kernel over the packed blocks; CUDA, bf16/fp16). Steps: every row's
prompt (chunked), a mixed step (short rows decoding + a chunk of the long prompt at an offset), then
decode-only steps, eager and as a CUDA graph. Printed: max |logit difference| against `rows` and the
mean milliseconds of each step kind.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from app.settings import Settings
from infrastructure.engine.runner import ModelRunner, Work
from scripts.bench_archs import ARCHS
from scripts.bench_setup import load


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="embedded", choices=["embedded", *ARCHS])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--rows", type=int, default=64, help="short rows (128-token prompts)")
    p.add_argument("--long", type=int, default=6000, help="tokens of the long row's prompt")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    return p.parse_args(argv)


class Rows:
    """Block tables handed out in order (no scheduler needed for a fixed set of rows)."""

    def __init__(self, lengths: list[int], block: int) -> None:
        self.block, self.tables, nxt = block, [], 0
        for n in lengths:
            count = -(-(n + 64) // block)
            self.tables.append(list(range(nxt, nxt + count)))
            nxt += count
        self.blocks = nxt


def timed(fn, repeats: int, device: str) -> tuple[float, object]:
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats, out


def run_kernel(loaded, kernel: str, args, prompts: list[list[int]]) -> dict:
    lengths = [len(p) for p in prompts]
    rows = Rows(lengths, 16)
    runner = ModelRunner(loaded.model, rows.blocks, 16, loaded.dtype, kernel, len(prompts), 1024)
    short, long_row = len(prompts) - 1, len(prompts) - 1
    for i, p in enumerate(prompts[:short]):  # short prompts: one step each
        runner.execute([Work(p, 0, rows.tables[i], [False] * len(p), True, i)], {})
    head = len(prompts[long_row]) - args.chunk
    for start in range(0, head, args.chunk):  # the long prompt up to its last chunk
        part = prompts[long_row][start : min(start + args.chunk, head)]
        runner.execute([Work(part, start, rows.tables[long_row], [False] * len(part), False, long_row)], {})
    decoding = [Work([7], lengths[i], rows.tables[i], [False], True, i) for i in range(short)]
    tail = prompts[long_row][head:]
    mixed = decoding + [Work(tail, head, rows.tables[long_row], [False] * len(tail), True, long_row)]
    mixed_ms, (mixed_logits, _) = timed(lambda: runner.execute(mixed, {}), args.repeats, args.device)
    everyone = decoding + [Work([7], lengths[long_row], rows.tables[long_row], [False], True, long_row)]
    decode_ms, (decode_logits, _) = timed(lambda: runner.execute(everyone, {}), args.repeats, args.device)
    out = {"mixed_ms": mixed_ms, "decode_ms": decode_ms, "mixed": mixed_logits, "decode": decode_logits}
    if args.device == "cuda" and kernel != "rows":
        from infrastructure.engine.graphs import DecodeGraphs

        graphs = DecodeGraphs(runner, len(prompts), rows.blocks * 16, min_seen=1)
        ms, (logits, _) = timed(lambda: graphs.run(everyone, {}, ("check",)), args.repeats, args.device)
        out |= {"graph_ms": ms, "graph": logits}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    loaded = load(args, Settings(_env_file=None, device=args.device))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (128,), generator=gen).tolist() for _ in range(args.rows - 1)]
    prompts.append(torch.randint(100, 20000, (args.long,), generator=gen).tolist())
    flash = ["flash", "flash_paged"] if args.device == "cuda" and loaded.dtype != torch.float32 else []
    kernels = ["rows", "grouped", *flash]
    print(f"{loaded.model_id} ({loaded.dtype}) on {args.device}: {args.rows - 1} rows × 128 + 1 × {args.long} tokens")
    print("| kernel | mixed step ms | decode step ms | decode graph ms | max abs Δ logits vs rows (mixed / decode) |")
    print("|---|---:|---:|---:|---|")
    base = None
    with torch.inference_mode():
        for kernel in kernels:
            try:
                r = run_kernel(loaded, kernel, args, prompts)
            except RuntimeError as exc:  # e.g. flash_paged where torch's kernel has no block_table argument
                print(f"| {kernel} | refused: {str(exc).splitlines()[0][:100]} | | | |", flush=True)
                continue
            if args.device == "cuda":
                torch.cuda.empty_cache()
            base = base or r
            diff = [(r[k] - base[k]).abs().max().item() for k in ("mixed", "decode")]
            if "graph" in r:
                diff.append((r["graph"] - base["decode"]).abs().max().item())
            graph = f"{r['graph_ms']:.2f}" if "graph_ms" in r else "n/a"
            deltas = " / ".join(f"{d:.3g}" for d in diff)
            print(f"| {kernel} | {r['mixed_ms']:.2f} | {r['decode_ms']:.2f} | {graph} | {deltas} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
