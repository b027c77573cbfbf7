"""Serving benchmark (issue 5): the real server over HTTP + SSE, one table, one JSON file.

    pipenv run python scripts/bench_serving.py --smoke                       # CI size, CPU, < 60 s
    pipenv run python scripts/bench_serving.py                               # embedded model, default size
    python scripts/bench_serving.py --arch qwen2.5-7b --json out.json        # GPU, random weights
    python scripts/bench_serving.py --arch llama-3.3-70b --layers 20

The server is `create_app` in uvicorn on 127.0.0.1 (a thread of this process) around an engine
that forces output lengths (every row ignores EOS, so every run decodes the same number of
tokens); clients stream POST /v1/steer/completion-chat. Workloads:
  W1 one steered client: decode tokens/s and % of the HBM roofline (copy bandwidth / weight bytes);
  W2 N concurrent clients with distinct vectors, the same unsteered, and the same steered against
     a one-request-at-a-time engine (max_batch_size=1, the seeds' design): aggregate tokens/s,
     p50/p99 time to first token and inter-token latency;
  W3 a STEERED+DEFAULT request vs a DEFAULT-only one: wall-time ratio (median of repeats);
  W4 assistant-axis monitoring on vs off (the W2 steered workload, run back to back): throughput ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from app.runtime import Runtime
from app.settings import Settings
from infrastructure.embedded import ensure_embedded
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob
from infrastructure.model_loader import LoadedModel, load_model, resolve_device
from infrastructure.persona.axis_data import AssistantAxis
from infrastructure.prompting import render_chat
from scripts.bench_archs import ARCHS, build_random_model, copy_bandwidth, weight_bytes
from scripts.bench_client import CHAT_ROUTE, ServerThread, latency_summary, run_concurrent_sync
from scripts.bench_report import render_table
from scripts.bench_trace import EngineTrace

FILLER = (
    "Please explain in careful detail how a city water system works, from the reservoir and the treatment "
    "plant through the pumping stations and the pipes under the streets to the tap in a kitchen, and what "
    "engineers do to keep the water clean, the pressure steady and the service running during storms, "
    "droughts, power cuts and the slow ageing of every valve, main and meter in the network."
).split()


class ForcedLengthEngine(PersonaEngine):
    """The engine with EOS ignored on every row: the benchmark's only knob, so runs decode equal lengths."""

    def submit(self, job: GenerationJob):
        job.rows = [replace(r, sampling=replace(r.sampling, ignore_eos=True)) for r in job.rows]
        return super().submit(job)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="embedded", choices=["embedded", *ARCHS], help="model shape (random weights)")
    p.add_argument("--layers", type=int, default=None, help="truncate a random-weight arch to N decoder layers")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--clients", type=int, default=None, help="W2 concurrent clients (64 on GPU, 8 on CPU)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (128)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per request (256 on GPU, 32 on CPU)")
    p.add_argument(
        "--seq-clients", type=int, default=None, help="clients of the one-at-a-time run (all on CPU, ≤ 16 on GPU)"
    )
    p.add_argument("--decode", default="auto", choices=["auto", "dynamic", "static", "graphs"], help="DECODE_MODE")
    p.add_argument("--repeats", type=int, default=3, help="W3 repetitions (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny CI-size run")
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder for random archs (default: the embedded model's)"
    )
    p.add_argument("--json", type=Path, default=None, help="where to write every number (default test-artifacts/)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    gpu = args.device == "cuda"
    if args.smoke:
        defaults = {"clients": 3, "prompt_tokens": 24, "new_tokens": 4, "threads": 1}
        args.repeats = 1
    else:
        defaults = {"clients": 64 if gpu else 8, "prompt_tokens": 128, "new_tokens": 256 if gpu else 32}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seq_clients is None:  # one at a time, 64 × 256 tokens would take minutes of GPU time for one number
        args.seq_clients = min(args.clients, 16) if gpu else args.clients
    args.seq_clients = min(args.seq_clients, args.clients)
    if args.threads:  # an oversubscribed CPU (several busy processes) is far slower with spinning OpenMP threads
        torch.set_num_threads(args.threads)
    if args.json is None:
        args.json = Path("test-artifacts") / f"bench_serving_{args.arch}_{args.device}.json"
    return args


def load(args: argparse.Namespace, settings: Settings) -> LoadedModel:
    """The embedded model as the server loads it, or a random-weight arch with the embedded tokenizer."""
    if args.arch == "embedded":
        return load_model(settings)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or ensure_embedded(settings.model_cache_dir))
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    model, seconds = build_random_model(args.arch, args.layers, args.device, tokenizer, dtype)
    params = next(model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        weights_id=f"random-weights/{args.arch}",
        model_id=f"random-weights/{args.arch}",
        source="random",
        device=model.get_input_embeddings().weight.device,
        devices=sorted({str(p.device) for p in model.parameters()}),
        dtype=params.dtype,
        quantization="none",
        load_seconds=seconds,
    )


def start_engine(loaded: LoadedModel, max_batch_size: int, decode: str = "auto") -> ForcedLengthEngine:
    engine = ForcedLengthEngine(loaded, max_batch_size=max_batch_size, max_queue=4096, decode=decode)
    engine.start()
    if not engine.wait_ready(600):
        raise RuntimeError(f"engine did not start: {engine.broken}")
    return engine


def prompt_for(tokenizer, client: int, target: int) -> tuple[str, int]:
    """A user turn whose rendered chat is about `target` tokens (words rotate per client)."""
    words = FILLER[client % len(FILLER) :] + FILLER[: client % len(FILLER)]
    best = ("", 0)
    for count in range(1, 20 * target):
        text = " ".join(words[i % len(words)] for i in range(count))
        n = len(render_chat(tokenizer, [{"role": "user", "content": text}]).ids)
        best = (text, n)
        if n >= target:
            break
    return best


def steer_vector(hidden: int, client: int) -> list[float]:
    """A distinct random direction per client (seeded, so runs repeat)."""
    g = torch.Generator().manual_seed(1000 + client)
    return torch.randn(hidden, generator=g).tolist()


class Bench:
    """The workloads against one server; numbers land in `self.results`."""

    def __init__(self, args, runtime: Runtime, loaded: LoadedModel, url: str) -> None:
        self.args, self.runtime, self.loaded, self.url = args, runtime, loaded, url
        self.layer = loaded.n_layers // 2
        self.prompts = [prompt_for(loaded.tokenizer, i, args.prompt_tokens) for i in range(args.clients)]
        self.results: dict = {}
        # the clients run in their own process, as real clients would: in this one they would take the GIL
        # from the server and the inference thread and the benchmark would measure itself
        self.clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def body(self, client: int, types: list[str], steered: bool) -> dict:
        vectors = []
        if steered:
            vec = steer_vector(self.loaded.hidden_size, client)
            vectors = [{"hook": f"blocks.{self.layer}.hook_resid_post", "strength": 4.0, "steering_vector": vec}]
        return {
            "prompt": [{"role": "user", "content": self.prompts[client][0]}],
            "types": types,
            "vectors": vectors,
            "normalize_steering": True,
            "temperature": 0,
            "seed": client,
            "n_completion_tokens": self.args.new_tokens,
            "stream": True,
        }

    def run(self, bodies: list[dict]) -> dict:
        """Run bodies concurrently; aggregate tokens/s (tokens counted by the engine) and latencies."""
        engine = self.runtime.engine
        before = engine.stats["tokens"]
        with EngineTrace(engine) as trace:
            results, wall = self.clients.submit(run_concurrent_sync, self.url, bodies).result()
        tokens = engine.stats["tokens"] - before
        expected = sum(len(b["types"]) for b in bodies) * self.args.new_tokens
        out = {"requests": len(bodies), "tokens": tokens, "expected_tokens": expected, "wall_s": wall}
        out |= {"tokens_per_s": tokens / wall} | latency_summary(results)
        out["axis_frames"] = sum(1 for r in results if r.final.get("assistant_axis"))
        out |= trace.summary(results)
        out["_results"] = results
        return out

    def w1(self) -> None:
        r = self.run([self.body(0, ["STEERED"], True)])
        [one] = r.pop("_results")
        decode_s = one.token_frames[-1] - one.token_frames[0] if len(one.token_frames) > 1 else one.ended - one.started
        r["decode_tokens_per_s"] = max(len(one.token_frames) - 1, 1) / decode_s
        bandwidth = copy_bandwidth(self.args.device)
        wbytes = weight_bytes(self.loaded.model)
        r |= {"weight_bytes": wbytes, "copy_bandwidth_Bps": bandwidth}
        r["roofline_tokens_per_s"] = bandwidth / wbytes if bandwidth else None
        r["pct_roofline"] = 100 * r["decode_tokens_per_s"] / r["roofline_tokens_per_s"] if bandwidth else None
        self.results["w1"] = r

    def w2(self, name: str, steered: bool, clients: int | None = None) -> None:
        n = clients or self.args.clients
        r = self.run([self.body(i, ["STEERED" if steered else "DEFAULT"], steered) for i in range(n)])
        r.pop("_results")
        self.results[name] = r

    def w3(self) -> None:
        pair, single = [], []
        for i in range(self.args.repeats):
            client = i % self.args.clients
            pair.append(self.run([self.body(client, ["STEERED", "DEFAULT"], True)])["wall_s"])
            single.append(self.run([self.body(client, ["DEFAULT"], False)])["wall_s"])
        self.results["w3"] = {
            "pair_wall_s": statistics.median(pair),
            "default_wall_s": statistics.median(single),
            "ratio": statistics.median(pair) / statistics.median(single),
            "repeats": self.args.repeats,
        }


def monitoring_axis(runtime: Runtime, loaded: LoadedModel) -> tuple[AssistantAxis, str]:
    """The model's real axis when persona data exists, else a random unit direction at the middle layer."""
    if runtime.axis is not None:
        return runtime.axis, "persona data"
    g = torch.Generator().manual_seed(7)
    direction = torch.randn(loaded.hidden_size, generator=g)
    axis = AssistantAxis(
        loaded.model_id, loaded.n_layers // 2, direction / direction.norm(), torch.zeros_like(direction)
    )
    return axis, "synthetic (no persona data for this model)"


def timed(name: str, step, *args, _last=[time.perf_counter()]) -> None:  # noqa: B006 (progress on stderr)
    step(*args)
    now = time.perf_counter()
    print(f"[bench] {name} done in {now - _last[0]:.1f}s", file=sys.stderr, flush=True)
    _last[0] = now


def run_workloads(bench: Bench, runtime: Runtime, axis: AssistantAxis) -> None:
    """Every workload in a fixed order; monitoring is on only for W4, the batched engine serves all but one."""
    if runtime.engine.decode_mode == "graphs":  # capture every batch/length shape once, outside the timings
        for name, steered, monitored in (("steered", True, False), ("unsteered", False, False), ("axis", True, True)):
            runtime.axis = axis if monitored else None
            timed(f"warm-up ({name})", bench.w2, "warm_up", steered)
        bench.results.pop("warm_up")
        timed("warm-up (W1)", bench.w1)
    runtime.axis = None
    timed("W1", bench.w1)
    timed("W2 steered", bench.w2, "w2_steered", True)
    timed("W2 unsteered", bench.w2, "w2_unsteered", False)
    timed("W3", bench.w3)
    timed("W4 monitoring off", bench.w2, "w4_monitoring_off", True)  # W2 steered again, right before "on"
    runtime.axis = axis
    timed("W4 monitoring on", bench.w2, "w4_monitoring_on", True)
    sequential = start_engine(bench.loaded, 1, bench.args.decode)
    runtime.attach(bench.loaded, sequential)
    runtime.axis = None
    timed("W2 one at a time", bench.w2, "w2_one_at_a_time", True, bench.args.seq_clients)
    sequential.stop()


def run_all(args: argparse.Namespace) -> dict:
    from app.factory import create_app

    settings = Settings(device=args.device, log_format="text", log_level="WARNING")
    loaded = load(args, settings)
    runtime = Runtime(settings, owns_engine=False)
    batched = start_engine(loaded, max(args.clients, 2), args.decode)
    runtime.attach(loaded, batched)
    axis, axis_source = monitoring_axis(runtime, loaded)
    app = create_app(runtime=runtime)
    if CHAT_ROUTE not in app.openapi()["paths"]:
        raise SystemExit(f"error: the server has no {CHAT_ROUTE} route; the benchmark streams through it")
    timed("model loaded, engine warmed", lambda: None)
    with ServerThread(app) as server:
        bench = Bench(args, runtime, loaded, server.url)
        run_workloads(bench, runtime, axis)
        bench.clients.shutdown()
    batched.stop()
    prompt_mean = statistics.mean(n for _, n in bench.prompts)
    return environment(args, loaded, axis_source) | {"prompt_tokens_mean": prompt_mean} | bench.results


def environment(args: argparse.Namespace, loaded: LoadedModel, axis_source: str) -> dict:
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": loaded.weights_id,
        "layers": loaded.n_layers,
        "hidden": loaded.hidden_size,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "clients": args.clients,
        "seq_clients": args.seq_clients,
        "new_tokens": args.new_tokens,
        "decode": args.decode,
        "axis_source": axis_source,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    numbers = run_all(args)
    numbers["total_s"] = time.perf_counter() - started
    table = render_table(numbers)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(numbers | {"table": table}, indent=2, default=str) + "\n")
    print(f"\nall numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
