"""Serving benchmark (issue 5): the real server over HTTP + SSE, one table, one JSON file.

    pipenv run python -m scripts.bench_serving --smoke                       # CI size, CPU, < 60 s
    pipenv run python -m scripts.bench_serving                               # embedded model, default size
    python -m scripts.bench_serving --arch qwen2.5-7b --json out.json        # GPU, random weights
    python -m scripts.bench_serving --arch llama-3.3-70b --layers 20

The server is `create_app` in uvicorn on 127.0.0.1 (a thread of this process) around an engine
that forces output lengths (every row ignores EOS, so every run decodes the same number of
tokens); clients stream POST /v1/steer/completion-chat. Workloads:
  W1 one steered client: decode tokens/s and % of the HBM roofline (copy bandwidth / weight bytes);
  W2 N concurrent clients with distinct vectors, the same unsteered, and the same steered against
     a one-request-at-a-time engine (max_batch_size=1, the seeds' design): aggregate tokens/s,
     p50/p99 time to first token and inter-token latency; then the steered bodies against an app that
     answers at once (`w2_http_floor`: the client harness, uvicorn and the loopback network alone);
  W3 a STEERED+DEFAULT request vs a DEFAULT-only one: wall-time ratio (median of repeats);
  W4 assistant-axis monitoring on vs off (the W2 steered workload, run back to back): throughput ratio;
  W5 mixed lengths: N-1 short clients + 1 long prompt (6,000 tokens on GPU), distinct vectors: the short
     rows' ITL p50 ÷ W2's, their TTFT p99, the long row's TTFT;
  W6 long context: one 32,000-token prompt alone (TTFT, decode tokens/s), then beside N-1 short ones;
  W7 realistic mix: 200 requests, long-tailed prompt lengths (lognormal, median 300, max 8,000), 32-512
     new tokens, Poisson arrivals at --w7-rate requests/s, fixed seed: tokens/s, TTFT and ITL p50/p99.
The paged engine's KV use is sampled every step (blocks used × block size ÷ tokens in the cache).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from app.runtime import Runtime
from app.settings import Settings
from infrastructure.model_loader import LoadedModel, resolve_device
from infrastructure.persona.axis_data import AssistantAxis
from scripts import bench_setup
from scripts.bench_archs import ARCHS, copy_bandwidth, weight_bytes
from scripts.bench_client import (
    CHAT_ROUTE,
    ServerThread,
    http_floor,
    latency_summary,
    run_arrivals_sync,
    run_concurrent_sync,
)
from scripts.bench_report import render_table
from scripts.bench_setup import environment, load, monitoring_axis, prompt_for, start_engine, steer_vector, w7_plan
from scripts.bench_trace import EngineTrace, KVWatch


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
    p.add_argument(
        "--decode", default="auto", choices=["auto", "paged", "dynamic", "static", "graphs"], help="DECODE_MODE"
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "flash", "flash_paged", "grouped", "rows"],
        help="paged attention kernel",
    )
    p.add_argument("--compile", default="auto", choices=["auto", "on", "merge", "off"], help="COMPILE")
    p.add_argument("--overlap", default="auto", choices=["auto", "on", "off"], help="OVERLAP_SCHEDULE")
    p.add_argument("--w5-long", type=int, default=None, help="W5 long prompt tokens (6,000 on GPU)")
    p.add_argument("--w6-long", type=int, default=None, help="W6 long prompt tokens (32,000 on GPU)")
    p.add_argument("--w7-requests", type=int, default=None, help="W7 requests (200)")
    p.add_argument("--w7-rate", type=float, default=None, help="W7 Poisson arrival rate, requests/s (8 on GPU)")
    p.add_argument("--repeats", type=int, default=3, help="W3 repetitions (median)")
    p.add_argument(
        "--sample-stacks",
        type=float,
        default=0.0,
        help="W2 steered once more, its threads' stacks sampled for this many seconds",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny CI-size run")
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder for random archs (default: the embedded model's)"
    )
    p.add_argument("--only", default=None, help="comma-separated workloads to run (W1,W2,W3,W4,W5,W6,W7,W2seq)")
    p.add_argument("--json", type=Path, default=None, help="where to write every number (default test-artifacts/)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    gpu = args.device == "cuda"
    if args.smoke:
        defaults = {"clients": 3, "prompt_tokens": 24, "new_tokens": 4, "threads": 1}
        defaults |= {"w5_long": 96, "w6_long": 160, "w7_requests": 6, "w7_rate": 20.0}
        args.repeats = 1
    else:
        defaults = {"clients": 64 if gpu else 8, "prompt_tokens": 128, "new_tokens": 256 if gpu else 32}
        defaults |= {"w5_long": 6000 if gpu else 1000, "w6_long": 32000 if gpu else 2000}
        defaults |= {"w7_requests": 200 if gpu else 24, "w7_rate": 8.0 if gpu else 1.0}
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

    def body(
        self, client: int, types: list[str], steered: bool, prompt: str | None = None, new: int = 0, seed: int = 0
    ) -> dict:
        vectors = []
        if steered:
            vec = steer_vector(self.loaded.hidden_size, seed + client)
            vectors = [{"hook": f"blocks.{self.layer}.hook_resid_post", "strength": 4.0, "steering_vector": vec}]
        return {
            "prompt": [{"role": "user", "content": prompt or self.prompts[client % len(self.prompts)][0]}],
            "types": types,
            "vectors": vectors,
            "normalize_steering": True,
            "temperature": 0,
            "seed": client,
            "n_completion_tokens": new or self.args.new_tokens,
            "stream": True,
        }

    def run(self, bodies: list[dict], offsets: list[float] | None = None, sample_s: float = 0.0) -> dict:
        """Run bodies concurrently (or at `offsets` s); aggregate tokens/s (counted by the engine), latencies."""
        engine = self.runtime.engine
        before = engine.stats["tokens"]
        kv = KVWatch(engine)
        with EngineTrace(engine, sample_s) as trace, kv:
            if offsets is None:
                results, wall = self.clients.submit(run_concurrent_sync, self.url, bodies).result()
            else:
                results, wall = self.clients.submit(run_arrivals_sync, self.url, bodies, offsets).result()
        tokens = engine.stats["tokens"] - before
        expected = sum(len(b["types"]) * b["n_completion_tokens"] for b in bodies)
        out = {"requests": len(bodies), "tokens": tokens, "expected_tokens": expected, "wall_s": wall}
        out |= {"tokens_per_s": tokens / wall} | latency_summary(results)
        out["axis_frames"] = sum(1 for r in results if r.final.get("assistant_axis"))
        out |= trace.summary(results) | kv.summary()
        out["_results"] = results
        return out

    def mixed(self, name: str, long_tokens: int, shorts: int) -> None:
        """`shorts` short steered clients and one long-prompt one, sent together: the short rows' latencies."""
        text, n_long = prompt_for(self.loaded.tokenizer, 99, long_tokens)
        bodies = [self.body(i, ["STEERED"], True) for i in range(shorts)]
        bodies.append(self.body(shorts, ["STEERED"], True, prompt=text))
        r = self.run(bodies)
        results = r.pop("_results")
        r |= {"long_prompt_tokens": n_long, "long_ttft_ms": 1000 * results[-1].ttft}
        r |= {"long_decode_tokens_per_s": decode_rate(results[-1])}
        if shorts:
            short = latency_summary(results[:-1])
            r |= {f"short_{k}": v for k, v in short.items()}
            base = self.results.get("w2_steered", {}).get("itl_p50_ms")
            r["short_itl_ratio"] = short["itl_p50_ms"] / base if base else None
        self.results[name] = r

    def w7(self) -> None:
        a = self.args
        small = a.smoke or a.device != "cuda"
        median, longest = (30, 120) if a.smoke else (300, 8000) if not small else (100, 1000)
        new_lo, new_hi = (2, 6) if a.smoke else (32, 512) if not small else (8, 64)
        plan = w7_plan(a.w7_requests, 7, median, longest, new_lo, new_hi, a.w7_rate)
        bodies = []
        for i, (p_tokens, new, _) in enumerate(plan):
            text, _ = prompt_for(self.loaded.tokenizer, i, p_tokens)
            bodies.append(self.body(i, ["STEERED"], True, prompt=text, new=new))
        r = self.run(bodies, [at for _, _, at in plan])
        r.pop("_results")
        r |= {"rate_per_s": a.w7_rate, "prompt_median": median, "prompt_max": longest, "new_range": [new_lo, new_hi]}
        self.results["w7"] = r

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

    def w2(self, name: str, steered: bool, clients: int | None = None, sample_s: float = 0.0) -> None:
        """N concurrent clients; `sample_s`: sample the threads' stacks (vectors then new to the prefix cache)."""
        n = clients or self.args.clients
        seed = 5000 if sample_s else 0
        bodies = [self.body(i, ["STEERED" if steered else "DEFAULT"], steered, seed=seed) for i in range(n)]
        r = self.run(bodies, sample_s=sample_s)
        r.pop("_results")
        self.results[name] = r

    def w2_floor(self) -> None:
        """W2's steered bodies sent the same way to an app that answers at once (`bench_client.http_floor`)."""
        bodies = [self.body(i, ["STEERED"], True) for i in range(self.args.clients)]
        self.results["w2_http_floor"] = http_floor(self.clients, bodies)

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


def decode_rate(result) -> float:
    """A stream's decode tokens/s: frames after the first over the time they took."""
    frames = result.token_frames
    return (len(frames) - 1) / (frames[-1] - frames[0]) if len(frames) > 1 else 0.0


ONLY: set[str] = set()  # --only: the workloads to run (empty: all)


def timed(name: str, step, *args, _last=[time.perf_counter()]) -> None:  # noqa: B006 (progress on stderr)
    workload = "W2seq" if name == "W2 one at a time" else name.split()[0]
    if ONLY and workload.startswith("W") and workload not in ONLY:
        return
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
    timed("W2 HTTP floor (no model)", bench.w2_floor)
    if bench.args.sample_stacks:  # W2 steered again (new vectors), its threads' stacks sampled
        timed("W2 steered, stacks sampled", bench.w2, "w2_steered_sampled", True, None, bench.args.sample_stacks)
    timed("W3", bench.w3)
    timed("W4 monitoring off", bench.w2, "w4_monitoring_off", True)  # W2 steered again, right before "on"
    runtime.axis = axis
    timed("W4 monitoring on", bench.w2, "w4_monitoring_on", True)
    runtime.axis = None
    args = bench.args
    timed("W5 mixed lengths", bench.mixed, "w5", args.w5_long, args.clients - 1)
    timed("W6 long prompt alone", bench.mixed, "w6_alone", args.w6_long, 0)
    timed("W6 long prompt beside short ones", bench.mixed, "w6_mixed", args.w6_long, args.clients - 1)
    timed("W7 realistic mix", bench.w7)
    tokens = 4 * (max(n for _, n in bench.prompts) + args.new_tokens)  # a small pool: the batched engine holds the GPU
    sequential = start_engine(bench.loaded, 1, bench.args.decode, kv_cache_tokens=tokens)
    runtime.attach(bench.loaded, sequential)
    runtime.axis = None
    timed("W2 one at a time", bench.w2, "w2_one_at_a_time", True, bench.args.seq_clients)
    sequential.stop()


def run_all(args: argparse.Namespace) -> dict:
    from app.factory import create_app

    settings = Settings(device=args.device, log_format="text", log_level="WARNING")
    loaded = load(args, settings)
    runtime = Runtime(settings, owns_engine=False)
    batched = start_engine(loaded, max(args.clients, 2), args.decode, max_model_len=max(65536, args.w6_long + 1024))
    runtime.attach(loaded, batched)
    axis, axis_source = monitoring_axis(runtime, loaded)
    app = create_app(runtime=runtime)
    if CHAT_ROUTE not in app.openapi()["paths"]:
        raise SystemExit(f"error: the server has no {CHAT_ROUTE} route; the benchmark streams through it")
    timed("model loaded, engine warmed", lambda: None)
    startup = {"compile": batched.compile_mode, "engine_warmup_s": batched.warmup_seconds, "overlap": batched.overlap}
    with ServerThread(app) as server:
        bench = Bench(args, runtime, loaded, server.url)
        run_workloads(bench, runtime, axis)
        bench.clients.shutdown()
    startup["chained_steps"] = batched.chained_launches
    batched.stop()
    prompt_mean = statistics.mean(n for _, n in bench.prompts)
    return environment(args, loaded, axis_source) | {"prompt_tokens_mean": prompt_mean} | startup | bench.results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_setup.ATTENTION[0] = args.attention
    bench_setup.COMPILE[0] = args.compile
    bench_setup.OVERLAP[0] = args.overlap
    ONLY.update(w.strip() for w in (args.only or "").split(",") if w.strip())
    started = time.perf_counter()
    numbers = run_all(args)
    numbers["total_s"] = time.perf_counter() - started
    table = render_table(numbers) if not ONLY else f"(only {args.only}: see the JSON)"
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(numbers | {"table": table}, indent=2, default=str) + "\n")
    print(f"\nall numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
