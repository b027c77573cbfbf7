"""Host (Python) time of the paged engine's decode step, the model's forward left out (issue 14).

    pipenv run python -m scripts.bench_host_step                      # CPU: 1 and 64 rows, steered
    pipenv run python -m scripts.bench_host_step --profile 20         # + the 20 costliest functions

On a GPU the decode step is one CUDA-graph replay; everything around it (scheduling, the step's inputs,
sampling, stop checks, detokenising, events to the event loop, retiring rows) is Python on the inference
thread and must hide under the replay. Here the forward is a stub returning fixed logits of a small
vocabulary, so what remains is that host work alone, measurable on any CPU: the engine decodes `rows`
steered rows (one distinct vector each, as W2) to a forced length while an asyncio loop in the main thread
reads their events (`--reader-us N` spends N µs of Python per event there, as building an SSE frame does), and
the per-step wall time of the steady decode steps is reported (median, µs). Not covered: the CUDA-graph inputs'
upload (`graphs.py`), the replay and the device-to-host wait.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import sys
import time

import torch

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.model_loader import LoadedModel
from infrastructure.steering.spec import SteeringSpec, add_op
from scripts.bench_archs import build_random_model

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=49408)
VOCAB = 512  # the stub's logits: ids the tokenizer decodes (ordinary byte-level tokens)


def tiny_model(tokenizer) -> LoadedModel:
    model, seconds = build_random_model("qwen2.5-7b", 2, "cpu", tokenizer, torch.float32, TINY)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        weights_id="random-weights/tiny",
        model_id="random-weights/tiny",
        source="random",
        device=torch.device("cpu"),
        devices=["cpu"],
        dtype=torch.float32,
        quantization="none",
        load_seconds=seconds,
    )


def stub_forward(engine: PersonaEngine):
    """The step's forward replaced: logits [k, VOCAB] for the k works that sample (a fixed token per row)."""
    logits = torch.full((engine.max_batch_size, VOCAB), -1.0)
    logits[torch.arange(engine.max_batch_size), 300 + torch.arange(engine.max_batch_size) % 200] = 1.0

    def forward(works, tables):
        k = sum(w.wants_logits for w in works)
        return logits[:k], {}

    return forward


def busy(us: float) -> None:
    """Pure Python for `us` microseconds (holds the GIL, as building and sending an SSE frame does)."""
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def decode(
    engine: PersonaEngine, rows: int, new: int, hidden: int, layer: int, reader_us: float = 0
) -> list[float]:
    """`rows` single-row steered jobs decoded to `new` tokens; the engine's step durations (s)."""
    steps: list[tuple[int, int, float, float]] = []
    unsubscribe = engine.observers.subscribe(
        step=lambda info: steps.append((info["rows"], info["prefill_tokens"], info["started"], info["ended"]))
    )
    jobs = []
    for r in range(rows):
        v = torch.randn(hidden, generator=torch.Generator().manual_seed(r))
        spec = SteeringSpec((add_op(layer, v / v.norm(), 4.0),))
        sampling = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        prompt = tuple(range(400, 400 + 24 + r % 8))
        jobs.append(GenerationJob([RowRequest(prompt, sampling, spec)]))

    async def read(job: GenerationJob) -> int:
        frames = 0
        async for _ in engine.submit(job):
            frames += 1
            busy(reader_us)
        return frames

    await asyncio.gather(*(read(j) for j in jobs))
    unsubscribe()
    full = [(s, e) for n, p, s, e in steps if n == rows and p == 0]
    full = full[len(full) // 4 :]  # steady state: every row decoding
    return [b[0] - a[0] for a, b in zip(full, full[1:])]  # start to start: the step rate


def measure(loaded: LoadedModel, rows: int, new: int, profile: int, reader_us: float = 0) -> dict:
    engine = PersonaEngine(loaded, max_batch_size=max(rows, 2), compile="off", kv_cache_tokens=rows * 256 + 4096)
    engine.start()
    if not engine.wait_ready(300):
        raise RuntimeError(f"engine did not start: {engine.broken}")
    engine._forward_step = stub_forward(engine)
    hidden, layer = loaded.hidden_size, loaded.n_layers // 2
    asyncio.run(decode(engine, rows, 8, hidden, layer))  # warm-up
    prof = cProfile.Profile() if profile else None
    if prof is not None:  # cProfile is per thread: enabled by the inference thread around each of its steps
        step = engine._step

        def profiled() -> None:
            prof.enable()
            try:
                step()
            finally:
                prof.disable()

        engine._step = profiled
    started = time.perf_counter()
    gaps = asyncio.run(decode(engine, rows, new, hidden, layer, reader_us))
    wall = time.perf_counter() - started
    engine.stop()
    median = 1e6 * statistics.median(gaps)
    out = {
        "rows": rows,
        "reader_us": reader_us,
        "switch_ms": 1e3 * sys.getswitchinterval(),
        "steps": len(gaps) + 1,
        "step_us_median": median,
        "us_per_row": median / rows,
    }
    out |= {"step_us_p90": 1e6 * sorted(gaps)[int(0.9 * (len(gaps) - 1))], "wall_s": wall}
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(profile)
        out["profile"] = buf.getvalue()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--profile", type=int, default=0, help="print the N costliest functions (cProfile)")
    p.add_argument("--reader-us", type=float, default=0, help="Python µs the event loop spends per event")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from infrastructure.embedded import ensure_embedded

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded(Settings().model_cache_dir))
    loaded = tiny_model(tokenizer)
    results = []
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            r = measure(loaded, rows, args.new_tokens, args.profile, args.reader_us)
            text = r.pop("profile", None)
            print(json.dumps(r), flush=True)
            if text:
                print(text)
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
