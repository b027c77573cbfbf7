"""Multi-GPU check (issue 7): one random-weight model on one GPU and split over two, compared token for token.

    python -m scripts.check_multi_gpu --tokenizer DIR --out DIR                  # a machine with 2 GPUs
    pipenv run python -m scripts.check_multi_gpu --tiny --device cpu --new-tokens 16 --clients 8 --out /tmp/mgpu

The arch (default qwen2.5-7b) is built once with random weights (seed 0) and saved; child processes load it
through the server's loader with LAYER_SPLIT_SIZE=1, then 2 (device_map="auto" over that many GPUs; on a
CPU: 1 twice, to exercise the comparison). Each runs one greedy job of 9 rows: 8 prompts steered by distinct
vectors at a layer on the first GPU, the middle layer and a late layer (on the second GPU when split), one row
at all three, and prompt 0 unsteered; it records where the engine built each steering table against the device
of that table's layer, then times 1 and N steered streams like bench_hardware. The parent compares the ids.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from scripts.bench_hardware import (
    ARCHS,
    ROOT,
    Report,
    base_spec,
    child_build,
    child_main,
    common_options,
    gpu_memory,
    load_through_loader,
    run_child,
    start_engine,
    throughput,
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen2.5-7b", choices=sorted(ARCHS))
    p.add_argument("--layers", type=int, default=None, help="truncate the arch to N decoder layers")
    p.add_argument("--check-tokens", type=int, default=64, help="greedy tokens per row of the comparison")
    p.add_argument(
        "--dtype",
        default="float32",
        help="MODEL_DTYPE of both runs (float32: random weights give near-tie logits that bf16 rounding flips)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "check_multi_gpu")
    common_options(p)
    return p.parse_args(argv)


def check_rows(loaded, spec: dict) -> tuple[list, list[int]]:
    """The comparison job: fixed prompt ids, distinct vectors per row, one row at every site, one unsteered."""
    from infrastructure.engine.job import RowRequest, SamplingParams
    from infrastructure.steering.spec import SteeringSpec, add_op

    n, gen = loaded.n_layers, torch.Generator().manual_seed(11)
    sites = sorted({n // 4, n // 2, n - 2})
    high, sampling = min(20000, len(loaded.tokenizer)), SamplingParams(max_new_tokens=spec["check_tokens"])
    prompts = [tuple(torch.randint(100, high, (spec["prompt_tokens"],), generator=gen).tolist()) for _ in range(8)]

    def op(site: int):
        return add_op(site, torch.randn(loaded.hidden_size, generator=gen), spec["strength"], normalize=True)

    rows = [RowRequest(prompts[i], sampling, SteeringSpec((op(sites[i % len(sites)]),))) for i in range(7)]
    rows.append(RowRequest(prompts[7], sampling, SteeringSpec(tuple(op(s) for s in sites))))
    return [*rows, RowRequest(prompts[0], sampling)], sites


def child_run(spec: dict) -> dict:
    """Load with spec['tp'] GPUs, run the comparison job and the throughput runs, report the placement."""
    from infrastructure.engine.engine import PersonaEngine
    from infrastructure.engine.job import GenerationJob
    from infrastructure.steering.sites import decoder_layers, site_module

    class RecordingEngine(PersonaEngine):
        """The engine, noting the device of every steering table it builds (per site)."""

        built_on: dict[int, set[str]] = {}

        def _record(self, tables) -> None:
            for site, table in tables.items():
                tensors = [table.add, *(u for u, _ in table.caps), *table.captures]
                self.built_on.setdefault(site, set()).update(str(t.device) for t in tensors if t is not None)

        def _steering_for(self, rows):  # legacy padded modes
            steering = super()._steering_for(rows)
            self._record(steering.tables)
            return steering

        def _row_tables(self, rows):  # the paged engine
            tables = super()._row_tables(rows)
            self._record(tables)
            return tables

    loaded = load_through_loader(spec | {"quantization": "none"})
    model, mem_load = loaded.model, gpu_memory(loaded)
    layers = [str(next(layer.parameters()).device) for layer in decoder_layers(model)]
    engine = start_engine(loaded, spec, RecordingEngine)
    try:
        rows, sites = check_rows(loaded, spec)
        ids = [f.token_ids for f in asyncio.run(engine.collect(GenerationJob(rows)))]
        again = [f.token_ids for f in asyncio.run(engine.collect(GenerationJob(rows)))]
        tables = {
            s: {"layer": layers[s], "device_of": str(next(site_module(model, s).parameters()).device)} for s in sites
        }
        for s in sites:
            tables[s]["tables"] = sorted(engine.built_on.get(s, ()))
        timing = throughput(engine, loaded, spec)
    finally:
        engine.stop()
    head = str(model.get_output_embeddings().weight.device)
    out = {
        "ids": ids,
        "repeatable": ids == again,
        "layers": layers,
        "tables": tables,
        "embed": str(loaded.device),
        "head": head,
    }
    gpu_bytes = torch.cuda.mem_get_info(0)[1] if loaded.device.type == "cuda" else None
    return out | timing | {"mem_load": mem_load, "load_s": loaded.load_seconds, "gpu_bytes": gpu_bytes}


def layer_ranges(layers: list[str]) -> str:
    """'layers 0-13 on cuda:0, 14-27 on cuda:1' from one device per layer."""
    runs: list[list] = []
    for i, device in enumerate(layers):
        if runs and runs[-1][0] == device:
            runs[-1][2] = i
        else:
            runs.append([device, i, i])
    return ", ".join(f"layers {a}-{b} on {d}" for d, a, b in runs)


def first_diff(a: list[int], b: list[int]) -> int | None:
    return None if a == b else next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(ids: list[list[int]], reference: list[list[int]]) -> str:
    """'9/9' or '7/9; first divergence: row 3 at token 17'."""
    same = sum(a == b for a, b in zip(ids, reference))
    text = f"{same}/{len(reference)}"
    for row, (a, b) in enumerate(zip(ids, reference)):
        if a != b:
            return f"{text}; first divergence: row {row} at token {first_diff(a, b)}"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child_main(args.child, {"build": child_build, "run": child_run})
    deadline, n, gpu = time.monotonic() + args.budget, args.clients, args.device == "cuda"
    columns = f"setting|GPUs|layers per GPU|same job twice|rows identical|1-stream tok/s|{n}-row tok/s|note"
    report = Report(args.out, "check_multi_gpu", columns)
    report.notes.append(
        f"`python {' '.join(sys.argv)}` (MODEL_DTYPE={args.dtype}; engine keywords: {json.dumps(args.engine_args)})"
    )
    spec = base_spec(args) | {"check_tokens": args.check_tokens, "dtype": args.dtype}
    tmp, ok, reference = Path(tempfile.mkdtemp(prefix="check_mgpu_")), True, None

    def child(log: str, **task):
        left = min(args.timeout, deadline - time.monotonic())
        return run_child(__spec__.name, spec | task | {"dir": str(tmp)}, args.out / "logs" / f"{log}.log", left)

    try:
        built, error = child("build", task="build", arch=args.arch, layers=args.layers)
        if error:
            report.add((0,), ["build", "—", "—", "—", "—", "—", "—", f"FAILED: {error}"], {"error": error})
            return 1
        report.device = built["device_name"]
        runs = [(f"LAYER_SPLIT_SIZE={tp}", tp) for tp in (1, 2)] if gpu else [("run A", 1), ("run B", 1)]
        for i, (label, tp) in enumerate(runs):
            r, error = child(f"tp{tp}-{i}", task="run", tp=tp)
            if r and tp > 1 and len(set(r["layers"])) < 2:  # accelerate kept every layer on one GPU: force a split
                util = round(0.6 * built["weight_bytes"] / r["gpu_bytes"], 4)
                label += f", GPU_MEMORY_UTILIZATION={util} (forced split: the default kept one GPU)"
                r, error = child(f"tp{tp}-{i}-forced", task="run", tp=tp, util=util)
            if error:
                ok = False
                report.add((i,), [label, "—", "—", "—", "—", "—", "—", f"FAILED: {error}"], {"error": error})
                continue
            per_gpu = " · ".join(f"{d} {r['layers'].count(d)}" for d in dict.fromkeys(r["layers"]))
            same = "reference" if reference is None else compare(r["ids"], reference)
            reference = reference or r["ids"]
            bad = {s: t for s, t in r["tables"].items() if t["tables"] != [t["layer"]] or t["device_of"] != t["layer"]}
            ok &= not bad and (same == "reference" or same.startswith(f"{len(reference)}/"))
            ok &= not (gpu and tp > 1 and len(set(r["layers"])) < 2)
            tables = ", ".join(
                f"layer {s} on {t['layer']}: tables on {'+'.join(t['tables'])}" for s, t in r["tables"].items()
            )
            note = tables + (" (all on their layer's device, as _device_of says)" if not bad else " MISMATCH")
            one, many = r["one"]["decode_tokens_per_s"], r["many"]["tokens_per_s"]
            one = "n/a" if one is None else f"{one:,.1f}"
            ok &= r["repeatable"]
            twice = "identical" if r["repeatable"] else "DIFFERENT"
            cells = [label, len(set(r["layers"])), per_gpu, twice, same, one, f"{many:,.1f}", note]
            report.add((i,), cells, {"setting": label, "tp": tp} | r)
            report.notes.append(f"{label}: {layer_ranges(r['layers'])}; embeddings {r['embed']}, lm_head {r['head']}.")
        if reference:
            k = first_diff(reference[0], reference[-1])
            effect = "NO difference" if k is None else f"they differ from token {k}"
            report.notes.append(f"Steering effect, row 0 (steered) vs row 8 (same prompt, unsteered): {effect}.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report.write()
    print("\n" + "\n".join(report.notes) + f"\n\ntable: {args.out / 'check_multi_gpu.md'}")
    print("CHECK PASSED" if ok else "CHECK FAILED: see the table")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
