"""Structured-output overhead: decode speed with a JSON-schema grammar per row versus none, engine only.

    python -m scripts.bench_structured --arch embedded --rows 1,4 --new-tokens 16      # CPU smoke test
    python -m scripts.bench_structured --arch qwen2.5-1.5b                             # GPU, random weights

For each batch size, greedy rows with forced lengths (`ignore_eos`) decode from 128-token prompts, once
unconstrained and once each following a JSON schema whose one string field keeps the row open (a random
model almost never closes it). Prints decode tokens/s and ms per step for both and the added ms per step
(and per token); then the grammar's own parts, timed alone: the CPU bitmask computation for that many
matchers and the whole mask step (bitmask + transfer + unpack + fill) on the logits' device.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.grammar import Constraint, _bitmasks, constrain, json_schema_grammar
from infrastructure.engine.job import GenerationJob, RowFinished, RowRequest, SamplingParams
from scripts.bench_archs import ARCHS
from scripts.bench_setup import load

SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="embedded", choices=["embedded", *ARCHS])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--rows", default="1,64")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the best counts)")
    args = p.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",")]
    return args


def rows_for(n: int, grammar: str | None, args: argparse.Namespace) -> list[RowRequest]:
    gen = torch.Generator().manual_seed(0)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, grammar=grammar)
    return [
        RowRequest(tuple(int(t) for t in torch.randint(100, 20000, (args.prompt_tokens,), generator=gen)), sampling)
        for _ in range(n)
    ]


async def timed(engine: PersonaEngine, rows: list[RowRequest]) -> tuple[float, int, int]:
    """(decode seconds: first token of every row -> last event, tokens generated, the longest row's tokens)."""
    first_done, seen, done = None, set(), []
    async for event in engine.submit(GenerationJob(rows)):
        row = getattr(event, "row", None)
        if row is not None and row not in seen:
            seen.add(row)
            if len(seen) == len(rows):
                first_done = time.perf_counter()
        if isinstance(event, RowFinished):
            done.append(event)
    end = time.perf_counter()
    tokens = [d.completion_tokens for d in done]
    return end - (first_done or end), sum(tokens), max(tokens)


def best(engine: PersonaEngine, n: int, grammar: str | None, args: argparse.Namespace) -> tuple[float, float, int]:
    """(decode tokens/s, ms per step, tokens) of the fastest of `repeats` runs after a warm-up run."""
    asyncio.run(timed(engine, rows_for(n, grammar, args)))
    runs = []
    for _ in range(args.repeats):
        seconds, tokens, longest = asyncio.run(timed(engine, rows_for(n, grammar, args)))
        steps = max(longest - 1, 1)
        runs.append(((tokens - n) / seconds, 1000 * seconds / steps, tokens))
    return max(runs)


def mask_parts(tokenizer, n: int, vocab: int, device: str, repeats: int = 50) -> tuple[float, float]:
    """(ms for the CPU bitmasks of n matchers, ms for the whole mask step on `device`), each per step."""
    grammar = json_schema_grammar(SCHEMA)
    constraints = [Constraint(grammar, tokenizer) for _ in range(n)]
    for c in constraints:
        c.consume(tokenizer('{"text": "', add_special_tokens=False)["input_ids"][0])
    logits = torch.randn(n, vocab, device=device)
    for _ in range(3):
        constrain(logits, constraints)
    start = time.perf_counter()
    for _ in range(repeats):
        _bitmasks(constraints)
    cpu = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        constrain(logits, constraints)
    if device == "cuda":
        torch.cuda.synchronize()
    whole = time.perf_counter() - start
    return 1000 * cpu / repeats, 1000 * whole / repeats


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    loaded = load(args, Settings(_env_file=None, device=args.device))
    engine = PersonaEngine(loaded, max_batch_size=max(args.rows), max_queue=64)
    engine.start()
    assert engine.wait_ready(600), engine.broken
    grammar = json_schema_grammar(SCHEMA)
    print(f"{loaded.model_id} on {args.device} ({engine.decode_mode}), {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, greedy, schema {SCHEMA}")  # fmt: skip
    print("| rows | none tok/s | json_schema tok/s | none ms/step | json_schema ms/step | added ms/step | "
          "added ms/token | json tokens |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.rows:
        plain_tps, plain_ms, _ = best(engine, n, None, args)
        json_tps, json_ms, json_tokens = best(engine, n, grammar, args)
        added = json_ms - plain_ms
        print(f"| {n} | {plain_tps:,.1f} | {json_tps:,.1f} | {plain_ms:.2f} | {json_ms:.2f} | {added:+.2f} | "
              f"{added / n:+.3f} | {json_tokens} |")  # fmt: skip
    engine.stop()
    vocab = int(loaded.model.config.vocab_size)
    print("\n| matchers | CPU bitmasks ms/step | whole mask step ms/step |\n|---:|---:|---:|")
    for n in args.rows:
        cpu, whole = mask_parts(loaded.tokenizer, n, vocab, args.device)
        print(f"| {n} | {cpu:.3f} | {whole:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
