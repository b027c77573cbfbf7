"""The serving benchmark's model and engine (scripts/bench_serving.py and the scripts that load its models): the
embedded model as the server loads it or a random-weight arch, the forced-length engine, the monitoring axis, and
the workloads' prompts, arrival plan and steering vectors, and the run's environment record."""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import random
import sys
from dataclasses import replace

import torch

from app.runtime import Runtime
from app.settings import Settings
from infrastructure.embedded import ensure_embedded
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob
from infrastructure.model_loader import LoadedModel, load_model
from infrastructure.persona.axis_data import AssistantAxis
from infrastructure.prompting import render_chat
from scripts.bench_archs import build_random_model
from scripts.bench_client import http_stack


class ForcedLengthEngine(PersonaEngine):
    """The engine with EOS ignored on every row: the benchmark's only knob, so runs decode equal lengths."""

    def submit(self, job: GenerationJob):
        job.rows = [replace(r, sampling=replace(r.sampling, ignore_eos=True)) for r in job.rows]
        return super().submit(job)


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


def start_engine(loaded: LoadedModel, max_batch_size: int, decode: str = "auto", **kw) -> ForcedLengthEngine:
    kw.setdefault("attention", ATTENTION[0])
    kw.setdefault("compile", COMPILE[0])
    kw.setdefault("overlap", OVERLAP[0])
    engine = ForcedLengthEngine(loaded, max_batch_size=max_batch_size, max_queue=4096, decode=decode, **kw)
    engine.start()
    if not engine.wait_ready(600):
        raise RuntimeError(f"engine did not start: {engine.broken}")
    return engine


ATTENTION = ["auto"]  # the paged attention kernel every engine of this run uses (--attention)
COMPILE = ["auto"]  # COMPILE of every engine of this run (--compile)
OVERLAP = ["auto"]  # OVERLAP_SCHEDULE of every engine of this run (--overlap)


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


def environment(args: argparse.Namespace, loaded: LoadedModel, axis_source: str) -> dict:
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "http_stack": http_stack(),
        "model": loaded.weights_id,
        "layers": loaded.n_layers,
        "hidden": loaded.hidden_size,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "clients": args.clients,
        "seq_clients": args.seq_clients,
        "new_tokens": args.new_tokens,
        "decode": args.decode,
        "attention": args.attention,
        "w5_long": args.w5_long,
        "w6_long": args.w6_long,
        "w7_requests": args.w7_requests,
        "w7_rate": args.w7_rate,
        "axis_source": axis_source,
    }


FILLER = (
    "Please explain in careful detail how a city water system works, from the reservoir and the treatment "
    "plant through the pumping stations and the pipes under the streets to the tap in a kitchen, and what "
    "engineers do to keep the water clean, the pressure steady and the service running during storms, "
    "droughts, power cuts and the slow ageing of every valve, main and meter in the network."
).split()


def prompt_for(tokenizer, client: int, target: int) -> tuple[str, int]:
    """A user turn whose rendered chat is about `target` tokens (words rotate per client): the fewest words
    that reach it (binary search; token counts grow with the word count)."""
    words = FILLER[client % len(FILLER) :] + FILLER[: client % len(FILLER)]

    def build(count: int) -> tuple[str, int]:
        text = " ".join(words[i % len(words)] for i in range(count))
        return text, len(render_chat(tokenizer, [{"role": "user", "content": text}]).ids)

    lo, hi = 1, max(2, 2 * target)
    while build(hi)[1] < target:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if build(mid)[1] >= target:
            hi = mid
        else:
            lo = mid + 1
    return build(lo)


def w7_plan(n: int, seed: int, median: int, longest: int, new_lo: int, new_hi: int, rate: float) -> list[tuple]:
    """(prompt tokens, new tokens, arrival offset s) per request: lognormal prompt lengths (median `median`,
    sigma 1, the longest set to `longest`), uniform output lengths, exponential gaps (Poisson arrivals)."""
    rng = random.Random(seed)
    prompts = [min(longest, max(16, round(median * math.exp(rng.gauss(0, 1))))) for _ in range(n)]
    prompts[max(range(n), key=prompts.__getitem__)] = longest
    news = [rng.randint(new_lo, new_hi) for _ in range(n)]
    at, offsets = 0.0, []
    for _ in range(n):
        offsets.append(at)
        at += rng.expovariate(rate)
    return list(zip(prompts, news, offsets))


def steer_vector(hidden: int, client: int) -> list[float]:
    """A distinct random direction per client (seeded, so runs repeat)."""
    g = torch.Generator().manual_seed(1000 + client)
    return torch.randn(hidden, generator=g).tolist()
