"""Tensor parallelism check (issue 16): one GPU against TENSOR_PARALLEL_SIZE=2, speed and greedy agreement.

    NCCL_NVLS_ENABLE=0 python -m scripts.check_tensor_parallel --out DIR                 # a machine with 2 GPUs
    pipenv run python -m scripts.check_tensor_parallel --tiny --device cpu --new-tokens 8 --clients 4 --out /tmp/tp

Random weights built from each arch's config (normal(0, 0.02) per tensor from a generator seeded by the
tensor's name, norms 1, biases 0), so one GPU and every rank of two see the same model. Nothing is saved:
each rank builds the model on the meta device, shards it, then materialises only its own slices on its GPU
(one full tensor at a time), so the 80-layer 70B shape (~141 GB in bf16) never exists whole on one device.
Each configuration runs in its own child process (its own timeout, clean GPUs); a tensor-parallel child is
rank 0 and spawns rank 1 like the server does. Rows: the Qwen2.5-7B shape on 1 GPU and on 2 (one steered
stream, then --clients concurrent requests with distinct vectors, then the 9-row × --check-tokens greedy job
of check_multi_gpu), and the Llama-3.3-70B shape on 2 (one stream). A 2-GPU child runs its decode steps the
first way of --tp-steps that works (TENSOR_PARALLEL_GRAPH_REDUCE values: symm_mem / nccl = CUDA graphs, off =
eager); --eager-row adds a one-stream row of eager TP steps with rank 0's time per step and in all-reduce
calls. The 1-GPU reference runs with COMPILE=off unless --engine-args says otherwise: the same arithmetic as
the tensor-parallel ranks (unfused layers, eager steering), so the greedy comparison isolates the sharding.
Children print their progress (and, with TENSOR_PARALLEL_STACK_DUMP_S set, every rank's stacks) to their log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scripts.bench_hardware import ROOT, Report, base_spec, child_main, common_options, gpu_memory, run_child
from scripts.check_multi_gpu import check_rows, compare

BIG = "llama-3.3-70b"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen2.5-7b", help="the 1-vs-2 GPU shape")
    p.add_argument("--big", default=BIG, help="the shape measured on 2 GPUs only ('' to skip)")
    p.add_argument("--layers", type=int, default=None, help="truncate both archs to N decoder layers")
    p.add_argument("--check-tokens", type=int, default=128, help="greedy tokens per row of the comparison")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--collective-timeout", type=float, default=60.0, help="TENSOR_PARALLEL_TIMEOUT_S of the children")
    p.add_argument("--tp-steps", default="symm_mem,off", help="2-GPU decode steps to try in order (comma-separated)")
    p.add_argument("--eager-row", action="store_true", help="add a one-stream row of eager TP (off) steps")
    p.add_argument("--overlap", default="auto", choices=["auto", "on", "off"], help="OVERLAP_SCHEDULE of every engine")
    p.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "check_tensor_parallel")
    common_options(p)
    return p.parse_args(argv)


@dataclass
class RandomShardSource:
    """A rank's shard of a random-weight arch, built in place on the rank's device (picklable: it travels to
    the worker). world=1 builds the whole model the same way."""

    arch: str
    layers: int | None
    tokenizer: str
    dtype: str
    device: str
    tiny: bool = False

    def full(self, name: str, param: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The unsharded tensor `name`, the same on every device: norms 1, biases 0, others N(0, 0.02)."""
        if name.endswith("norm.weight"):
            return torch.ones(param.shape, dtype=param.dtype, device=device)
        if name.endswith(".bias"):
            return torch.zeros(param.shape, dtype=param.dtype, device=device)
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        out = torch.empty(param.shape, dtype=param.dtype, device=device)
        return out.normal_(0.0, 0.02, generator=gen)

    def load(self, rank: int, world: int, group):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from infrastructure.engine.tp_shard import shard_model, shard_plan
        from infrastructure.model_loader import LoadedModel
        from scripts.bench_archs import _confine_to_tokenizer, arch_config
        from scripts.bench_hardware import TINY

        started = time.perf_counter()
        device = torch.device(f"cuda:{rank}" if self.device == "cuda" else "cpu")
        dtype = getattr(torch, self.dtype)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
        config = arch_config(self.arch, self.layers, TINY if self.tiny else None)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        base = model.get_decoder()
        base.rotary_emb = type(base.rotary_emb)(config=model.config).to(device)  # its buffers, computed
        if world > 1:
            shard_model(model, shard_plan(model.config, rank, world), group, lambda n, p: self.full(n, p, device))
        for name, param in list(model.named_parameters()):
            if param.is_meta:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(self.full(name, param, device), False))
        model.eval()
        if rank == 0:
            _confine_to_tokenizer(model, tokenizer)
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            weights_id=f"random {self.arch}",
            model_id=f"random {self.arch}",
            source="random",
            device=device,
            devices=[str(device)],
            dtype=dtype,
            quantization="none",
            load_seconds=time.perf_counter() - started,
        )


def _say(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def _time_all_reduces() -> dict:
    """Count rank 0's host time in NCCL all-reduce calls (the eager row's breakdown)."""
    from infrastructure.engine import tp_shard

    spent, real = {"s": 0.0, "calls": 0}, tp_shard.dist.all_reduce

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent["s"] += time.perf_counter() - started
            spent["calls"] += 1

    class Timed:  # torch.distributed, its all_reduce timed
        all_reduce = staticmethod(timed)

        def __getattr__(self, name: str):
            return getattr(torch.distributed, name)

    tp_shard.dist = Timed()
    return spent


def child_run(spec: dict) -> dict:
    """Build (sharded when tp > 1), start the engine, run the comparison job and the throughput runs."""
    from infrastructure.engine.engine import PersonaEngine
    from infrastructure.engine.job import GenerationJob
    from infrastructure.engine.tensor_parallel import start_tensor_parallel
    from infrastructure.engine.tp_workers import dump_stacks_from_env
    from scripts.bench_hardware import throughput

    dump_stacks_from_env()
    source = RandomShardSource(spec["arch"], spec["layers"], spec["tokenizer"], spec["dtype"], spec["device"])
    source.tiny = spec["tiny"]
    options = dict(max_batch_size=max(spec["clients"], 64), max_queue=256, compile="off") | spec["engine_args"]
    options["cuda_graphs"] = spec["graph_reduce"] != "off"
    options["overlap"] = spec.get("overlap", "auto")
    _say(f"building {spec['arch']} on {spec['tp']} rank(s), decode steps: {spec['graph_reduce']}")
    if spec["tp"] > 1:
        options["graph_reduce"] = spec["graph_reduce"]
        timeout, comm = spec["collective_timeout"], spec["graph_reduce"] == "nccl"
        loaded, engine = start_tensor_parallel(source, spec["tp"], spec["device"], timeout, comm, **options)
    else:
        loaded = source.load(0, 1, None)
        engine = PersonaEngine(loaded, **options)
    out = {"build_s": loaded.load_seconds, "mem_load": gpu_memory(loaded)}
    engine.start()
    try:
        if not engine.wait_ready(300):
            raise RuntimeError(f"engine did not start: {engine.broken}")
        out["mode"] = getattr(engine, "graph_reduce", "one GPU")
        _say(f"engine ready (warm-up {engine.warmup_seconds:.1f} s); decode steps: {out['mode']}")
        if spec["profile"]:
            spent, steps = _time_all_reduces(), engine.stats["steps"]
        if spec["check"]:
            rows, _ = check_rows(loaded, spec)  # with the top-2 logprobs, to tell a near tie from an error
            rows = [replace(r, sampling=replace(r.sampling, n_logprobs=2)) for r in rows]
            done = asyncio.run(engine.collect(GenerationJob(rows)))
            out["ids"] = [f.token_ids for f in done]
            out["margins"] = [[lp.top[0][1] - lp.top[1][1] for lp in f.logprobs] for f in done]
            _say("greedy comparison job done")
        if not spec["many"]:
            spec = spec | {"clients": 1}
        started = time.perf_counter()
        out |= throughput(engine, loaded, spec)
        _say(f"throughput done: {json.dumps({k: out[k] for k in ('one', 'many') if k in out})}")
        if spec["profile"]:
            steps, wall = engine.stats["steps"] - steps, time.perf_counter() - started
            out["profile"] = {"steps": steps, "ms_per_step": 1e3 * wall / max(steps, 1)}
            out["profile"] |= {"all_reduce_calls": spent["calls"], "all_reduce_ms_per_step": 1e3 * spent["s"] / steps}
            _say(f"rank 0 eager profile: {out['profile']}")
        out["graph_replays"] = engine.kv_stats().get("graph_replays", 0)
    finally:
        engine.stop(10)
        _say("engine stopped")
    return out


# how a child runs its decode steps: TENSOR_PARALLEL_GRAPH_REDUCE -> the table's label
LABELS = {"symm_mem": "CUDA graphs, symm_mem all-reduce", "nccl": "CUDA graphs, NCCL all-reduce", "off": "eager"}


def divergences(reference: dict, run: dict, arch: str, tp: int) -> list[str]:
    """Per diverging row: where, and the top-2 logprob gap of both runs there (a near tie, or not)."""
    out = []
    for row, (a, b) in enumerate(zip(reference["ids"], run["ids"])):
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is not None:
            gap, gap_tp = reference["margins"][row][k], run["margins"][row][k]
            out.append(
                f"{arch} TP={tp}, row {row}: first different token {k}; top-2 logprob gap there {gap:.4f} (1 GPU), "
                f"{gap_tp:.4f} (TP)"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:  # its result is written: no interpreter teardown (NCCL destructors) to wait on
        code = child_main(args.child, {"run": child_run})
        sys.stdout.flush()
        os._exit(code)
    from app.settings import Settings
    from infrastructure.embedded import ensure_embedded

    deadline, n = time.monotonic() + args.budget, args.clients
    columns = f"model|GPUs|steps|1-stream tok/s|{n}-client tok/s|greedy rows equal to 1 GPU|build s|note"
    report = Report(args.out, "check_tensor_parallel", columns)
    report.device = "CPU (gloo)" if args.device == "cpu" else "CUDA (NCCL)"
    report.notes.append(f"`python {' '.join(sys.argv)}` (dtype {args.dtype}; random weights built per rank)")
    tokenizer = str(args.tokenizer.resolve()) if args.tokenizer else str(ensure_embedded(Settings().model_cache_dir))
    spec = base_spec(args) | {"tokenizer": tokenizer, "check_tokens": args.check_tokens, "dtype": args.dtype}
    spec["overlap"] = args.overlap
    spec["collective_timeout"] = args.collective_timeout
    spec["layers"] = args.layers if args.layers is not None else (4 if args.tiny else None)
    reference, ok = None, True
    variants = args.tp_steps.split(",") if args.device == "cuda" else ["off"]
    plan = [(args.arch, 1, True, True, None), (args.arch, 2, True, True, None)]
    plan += [(args.big, 2, False, False, None)] if args.big else []
    plan += [(args.arch, 2, False, False, "off")] if args.eager_row else []
    try:
        for i, (arch, tp, check, many, forced) in enumerate(plan):
            task = spec | {"task": "run", "arch": arch, "tp": tp, "check": check, "many": many}
            task["profile"] = forced == "off"
            r, error, steps = None, "not run", ""
            tries = ["symm_mem" if args.device == "cuda" else "off"] if tp == 1 else [forced] if forced else variants
            for mode in tries:
                steps = "CUDA graphs" if tp == 1 and mode != "off" else LABELS[mode]
                left = min(args.timeout, deadline - time.monotonic())
                log = args.out / "logs" / f"{arch}-tp{tp}-{mode}.log"
                r, error = run_child(__spec__.name, task | {"graph_reduce": mode}, log, left)
                if r is not None:
                    if tp > 1 and not forced:  # the bigger shape runs the way that worked
                        variants = [mode]
                    break
                report.notes.append(f"{arch} on {tp} GPU(s), {steps}: FAILED: {error} (log: {log.name})")
            if r is None:
                ok = False
                report.add((i,), [arch, tp, steps, "—", "—", "—", "—", f"FAILED: {error}"], {"error": error})
                continue
            one = r["one"]["decode_tokens_per_s"]
            many = r["many"]["tokens_per_s"] if many else None
            same = "—"
            if check:
                same = "reference" if reference is None else compare(r["ids"], reference["ids"])
                if reference is None:
                    reference = r
                else:
                    report.notes += divergences(reference, r, arch, tp)
            cells = [arch, tp, steps, f"{one or 0:,.1f}", "—" if many is None else f"{many:,.1f}", same]
            note = f"{r['graph_replays']} graph replays; peak {r['mem_peak'].get('peak_allocated', 0) / 1e9:.1f} GB"
            if "profile" in r:
                prof = r["profile"]
                note += f"; rank 0: {prof['ms_per_step']:.1f} ms/step, "
                note += f"{prof['all_reduce_ms_per_step']:.1f} of them in all-reduce calls"
            report.add((i,), [*cells, f"{r['build_s']:.0f}", note], {"arch": arch, "tp": tp, "steps": steps} | r)
    finally:
        report.write()
    print("\n" + "\n".join(report.notes) + f"\n\ntable: {args.out / 'check_tensor_parallel.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
