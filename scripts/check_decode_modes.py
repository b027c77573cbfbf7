"""Do the decode modes agree? The same greedy requests through DECODE_MODE=paged (also with 32-token
steps, i.e. chunked prompts, and with a KV pool so small that rows are preempted and recomputed),
dynamic, static and graphs.

    pipenv run python -m scripts.check_decode_modes                           # embedded model, CPU
    python -m scripts.check_decode_modes --arch qwen2.5-1.5b --tokenizer DIR  # GPU: graphs too

Each mode serves, on its own engine: every request alone, then all of them at once (rows joining a
running batch, leaving at different lengths), some steered (add and cap, distinct vectors and layers),
some not. Printed: per mode pair, how many rows produced identical token ids and the first divergence.
Static and graphs run the same kernels in the same shapes, so they should agree bit for bit; dynamic
differs in attention shapes (no padding columns), so rare near-tie flips are possible on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import torch

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.steering.hooks import our_hooks
from infrastructure.steering.spec import SteeringSpec, add_op, cap_op
from scripts.bench_archs import ARCHS
from scripts.bench_setup import load


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="embedded", choices=["embedded", *ARCHS])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="random-weight archs only")
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=48)
    return p.parse_args(argv)


def requests(loaded, n: int, new_tokens: int) -> list[RowRequest]:
    """n rows: prompt lengths 16..80, lengths new_tokens/2..new_tokens, every third unsteered."""
    gen = torch.Generator().manual_seed(0)
    hidden, layers = loaded.hidden_size, loaded.n_layers
    rows = []
    for i in range(n):
        ids = tuple(int(t) for t in torch.randint(100, 20000, (16 + (i * 7) % 65,), generator=gen))
        v = torch.randn(hidden, generator=gen)
        ops = ()
        if i % 3:
            ops = (add_op(layers // 2 - i % 4, v / v.norm(), 4.0 + i),)
            if i % 3 == 2:
                ops += (cap_op(layers // 2 + 1, torch.randn(hidden, generator=gen), 1.0),)
        length = new_tokens // 2 + (i * 5) % (new_tokens // 2 + 1)
        rows.append(
            RowRequest(ids, SamplingParams(max_new_tokens=length, ignore_eos=True), SteeringSpec(ops) if ops else None)
        )
    return rows


async def serve(engine: PersonaEngine, rows: list[RowRequest]) -> tuple[list[list[int]], list[list[int]]]:
    alone = [(await engine.collect(GenerationJob([r])))[0].token_ids for r in rows]
    together = await asyncio.gather(*(engine.collect(GenerationJob([r])) for r in rows))
    return alone, [t[0].token_ids for t in together]


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    firsts = [next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(a, b) if x != y]
    return f"{same}/{len(a)} identical" + (f", first divergence at tokens {firsts}" if firsts else "")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    loaded = load(args, Settings(_env_file=None, device=args.device))
    rows = requests(loaded, args.rows, args.new_tokens)
    longest = max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in rows)
    pool = args.rows * (longest + 16)
    variants = {
        "paged": {"decode": "paged", "kv_cache_tokens": pool},
        "paged-chunked": {"decode": "paged", "kv_cache_tokens": pool, "step_tokens": 32},
        "paged-preempting": {"decode": "paged", "kv_cache_tokens": 3 * (longest + 16)},
        "dynamic": {"decode": "dynamic"},
        "static": {"decode": "static", "static_len": 512},
    }
    if args.device == "cuda":
        variants["paged-eager"] = {"decode": "paged", "kv_cache_tokens": pool, "cuda_graphs": False}
        variants["graphs"] = {"decode": "graphs", "static_len": 512}
    modes = list(variants)
    out: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
    preempted = 0
    for mode, kwargs in variants.items():
        engine = PersonaEngine(loaded, max_batch_size=args.rows, **kwargs)
        engine.start()
        assert engine.wait_ready(600), engine.broken
        out[mode] = asyncio.run(serve(engine, rows))
        preempted += engine.stats.get("preemptions", 0) if mode == "paged-preempting" else 0
        engine.stop()
        assert our_hooks(loaded.model) == [], "a steering hook outlived its forward"
    print(f"{loaded.model_id} on {args.device}: {args.rows} greedy rows, up to {args.new_tokens} tokens")
    print(f"paged-preempting: {preempted} preemptions")
    print("| compared | rows |\n|---|---|")
    for mode in modes:
        print(f"| {mode}: batched vs alone | {agreement(out[mode][1], out[mode][0])} |")
    for i, a in enumerate(modes):
        for b in modes[i + 1 :]:
            print(f"| alone: {a} vs {b} | {agreement(out[a][0], out[b][0])} |")
            print(f"| batched: {a} vs {b} | {agreement(out[a][1], out[b][1])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
