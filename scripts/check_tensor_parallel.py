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
of check_multi_gpu), and the Llama-3.3-70B shape on 2 (one stream). If a 2-GPU child fails with CUDA graphs,
it runs again with eager steps.
"""

from __future__ import annotations

import argparse
import asyncio
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


def child_run(spec: dict) -> dict:
    """Build (sharded when tp > 1), start the engine, run the comparison job and the throughput runs."""
    from infrastructure.engine.engine import PersonaEngine
    from infrastructure.engine.job import GenerationJob
    from infrastructure.engine.tensor_parallel import start_tensor_parallel
    from scripts.bench_hardware import throughput

    source = RandomShardSource(spec["arch"], spec["layers"], spec["tokenizer"], spec["dtype"], spec["device"])
    source.tiny = spec["tiny"]
    options = dict(max_batch_size=max(spec["clients"], 64), max_queue=256) | spec["engine_args"]
    options["cuda_graphs"] = spec["graphs"]
    if spec["tp"] > 1:
        timeout, comm = spec["collective_timeout"], spec["graph_comm"]
        loaded, engine = start_tensor_parallel(source, spec["tp"], spec["device"], timeout, comm, **options)
    else:
        loaded = source.load(0, 1, None)
        engine = PersonaEngine(loaded, **options)
    out = {"build_s": loaded.load_seconds, "mem_load": gpu_memory(loaded)}
    engine.start()
    try:
        if not engine.wait_ready(300):
            raise RuntimeError(f"engine did not start: {engine.broken}")
        if spec["check"]:
            rows, _ = check_rows(loaded, spec)  # with the top-2 logprobs, to tell a near tie from an error
            rows = [replace(r, sampling=replace(r.sampling, n_logprobs=2)) for r in rows]
            done = asyncio.run(engine.collect(GenerationJob(rows)))
            out["ids"] = [f.token_ids for f in done]
            out["margins"] = [[lp.top[0][1] - lp.top[1][1] for lp in f.logprobs] for f in done]
        if not spec["many"]:
            spec = spec | {"clients": 1}
        out |= throughput(engine, loaded, spec)
        out["graph_replays"] = engine.kv_stats().get("graph_replays", 0)
    finally:
        engine.stop(10)
    return out


# how a 2-GPU child runs its decode steps, tried in this order until one works: (label, CUDA graphs, own comm)
STEPS = [("CUDA graphs, own NCCL comm", True, True), ("CUDA graphs", True, False), ("eager", False, False)]


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
    if args.child:
        return child_main(args.child, {"run": child_run})
    from app.settings import Settings
    from infrastructure.embedded import ensure_embedded

    deadline, n = time.monotonic() + args.budget, args.clients
    columns = f"model|GPUs|steps|1-stream tok/s|{n}-client tok/s|greedy rows equal to 1 GPU|build s|note"
    report = Report(args.out, "check_tensor_parallel", columns)
    report.device = "CPU (gloo)" if args.device == "cpu" else "CUDA (NCCL)"
    report.notes.append(f"`python {' '.join(sys.argv)}` (dtype {args.dtype}; random weights built per rank)")
    tokenizer = str(args.tokenizer.resolve()) if args.tokenizer else str(ensure_embedded(Settings().model_cache_dir))
    spec = base_spec(args) | {"tokenizer": tokenizer, "check_tokens": args.check_tokens, "dtype": args.dtype}
    spec["collective_timeout"] = args.collective_timeout
    spec["layers"] = args.layers if args.layers is not None else (4 if args.tiny else None)
    reference, ok, variants = None, True, STEPS if args.device == "cuda" else STEPS[-1:]
    plan = [(args.arch, 1, True, True), (args.arch, 2, True, True)]
    plan += [(args.big, 2, False, False)] if args.big else []
    try:
        for i, (arch, tp, check, many) in enumerate(plan):
            task = spec | {"task": "run", "arch": arch, "tp": tp, "check": check, "many": many}
            r, error, steps = None, "not run", ""
            for steps, graphs, comm in variants[:1] if tp == 1 else variants:
                left = min(args.timeout, deadline - time.monotonic())
                log = args.out / "logs" / f"{arch}-tp{tp}-{'graphs' if graphs else 'eager'}{'-own' if comm else ''}.log"
                r, error = run_child(__spec__.name, task | {"graphs": graphs, "graph_comm": comm}, log, left)
                if r is not None:
                    if tp > 1:  # the bigger shape runs the way that worked
                        variants = [v for v in variants if v[0] == steps]
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
            report.add((i,), [*cells, f"{r['build_s']:.0f}", note], {"arch": arch, "tp": tp, "steps": steps} | r)
    finally:
        report.write()
    print("\n" + "\n".join(report.notes) + f"\n\ntable: {args.out / 'check_tensor_parallel.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
