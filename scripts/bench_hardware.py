"""Hardware table (issue 7): GPU memory and steered throughput per model shape and quantisation.

    python -m scripts.bench_hardware --tokenizer DIR --out DIR                        # GPU: the README table
    pipenv run python -m scripts.bench_hardware --tiny --device cpu --new-tokens 16 --clients 8 --out /tmp/hw

A child builds each arch from its config with random weights (seed 0) and saves it; one child per configuration
(own timeout, clean GPU) loads it through the server's loader and times a PersonaEngine; archs run in parallel, one
per GPU. The 70B shape is measured at --layers-70b layers and half that; the 80-layer row is the line through both.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch  # never initialises CUDA in the parent: children measure clean GPUs

from scripts.bench_archs import ARCHS

ROOT = Path(__file__).resolve().parents[1]

BIG = "llama-3.3-70b"
BIG_LAYERS = ARCHS[BIG]["num_hidden_layers"]
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=49408)
COLUMNS = "arch|quantization|weights GB|GPU mem after load GB|GPU mem at {n} requests GB|1-stream tok/s|{n}-client "
MEMORY = ("weights", "load_alloc", "load_used", "peak_alloc", "peak_used")


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="shrink the arch (hidden 64, ≤ 4 layers): a CPU flow check")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the embedded model's)")
    p.add_argument("--new-tokens", type=int, default=128, help="forced tokens per request")
    p.add_argument("--clients", type=int, default=64, help="concurrent single-row requests")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--strength", type=float, default=8.0, help="steering coefficient on unit vectors")
    p.add_argument("--timeout", type=float, default=300, help="seconds per child process")
    p.add_argument("--budget", type=float, default=510, help="seconds for everything; later children are skipped")
    p.add_argument("--engine-args", type=json.loads, default={}, help="PersonaEngine keywords (JSON)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def base_spec(args: argparse.Namespace) -> dict:
    keys = ("device", "tiny", "clients", "prompt_tokens", "new_tokens", "strength", "engine_args")
    tokenizer = str(args.tokenizer.resolve()) if args.tokenizer else None  # children run in the repository root
    return {k: getattr(args, k) for k in keys} | {"tokenizer": tokenizer}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=f"qwen2.5-1.5b,qwen2.5-3b,qwen2.5-7b,{BIG}", help="comma-separated")
    p.add_argument("--quantizations", default="none,bnb-4bit", help="comma-separated QUANTIZATION values")
    p.add_argument("--layers-70b", type=int, default=8, help="decoder layers of the measured 70B shape (≥ 2)")
    p.add_argument("--gpus", type=int, default=None, help="configurations at once, one per GPU (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "bench_hardware")
    common_options(p)
    args = p.parse_args(argv)
    args.archs, args.quantizations = args.archs.split(","), args.quantizations.split(",")
    if unknown := set(args.archs) - set(ARCHS):
        p.error(f"unknown arch {sorted(unknown)}; choose from {sorted(ARCHS)}")
    return args


def child_build(spec: dict) -> dict:
    """Random-weight model (seed 0) built on the device, saved with the tokenizer into spec['dir']."""
    from transformers import AutoTokenizer

    from app.settings import Settings
    from infrastructure.embedded import ensure_embedded
    from scripts.bench_archs import build_random_model, weight_bytes

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"] or ensure_embedded(Settings().model_cache_dir))
    layers, gpu = spec.get("layers") or (4 if spec["tiny"] else None), spec["device"] == "cuda"
    model, build_s = build_random_model(
        spec["arch"], layers, spec["device"], tokenizer, overrides=TINY if spec["tiny"] else None
    )
    started = time.perf_counter()
    model.save_pretrained(spec["dir"])
    tokenizer.save_pretrained(spec["dir"])
    out = {"weight_bytes": weight_bytes(model), "layers": model.config.num_hidden_layers, "build_s": build_s}
    name = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
    return out | {"save_s": time.perf_counter() - started, "device_name": name}


def load_through_loader(spec: dict):
    """The saved folder loaded exactly as the server does (Settings → load_model)."""
    from app.settings import Settings
    from infrastructure.model_loader import load_model

    fields = dict(model_name=spec["dir"], model_id=None, override_model_id=None)
    fields["model_dtype"] = spec.get("dtype", "auto")
    fields |= dict(device=spec["device"], quantization=spec["quantization"], layer_split_size=spec.get("tp", 1))
    fields["gpu_memory_utilization"] = spec.get("util") or Settings.model_fields["gpu_memory_utilization"].default
    return load_model(Settings(log_format="text", log_level="WARNING", **fields))


def gpu_memory(loaded) -> dict:
    """Allocated, peak allocated and device-used bytes over the GPUs holding the model (empty on the CPU)."""
    ids = sorted({int(d.split(":")[1]) for d in loaded.devices if d.startswith("cuda:")})
    used = sum(total - free for free, total in map(torch.cuda.mem_get_info, ids))
    out = {"allocated": sum(map(torch.cuda.memory_allocated, ids)), "used": used}
    return out | {"peak_allocated": sum(map(torch.cuda.max_memory_allocated, ids))} if ids else {}


def start_engine(loaded, spec: dict, engine_cls=None):
    from infrastructure.engine.engine import PersonaEngine

    batch, cls = spec["clients"], engine_cls or PersonaEngine
    engine = cls(loaded, max_batch_size=max(batch, 64), max_queue=max(256, 2 * batch), **spec["engine_args"])
    engine.start()
    if not engine.wait_ready(600):
        raise RuntimeError(f"engine did not start: {engine.broken}")
    return engine


def steered_rows(loaded, n: int, spec: dict, new_tokens: int, seed: int) -> list:
    """n rows of fixed random prompt ids, each with its own unit vector × strength at the middle layer."""
    from infrastructure.engine.job import RowRequest, SamplingParams
    from infrastructure.steering.spec import SteeringSpec, add_op

    gen = torch.Generator().manual_seed(seed)
    high, sampling = min(20000, len(loaded.tokenizer)), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rows = []
    for _ in range(n):
        ids = tuple(torch.randint(100, high, (spec["prompt_tokens"],), generator=gen).tolist())
        op = add_op(loaded.n_layers // 2, torch.randn(loaded.hidden_size, generator=gen), spec["strength"], True)
        rows.append(RowRequest(ids, sampling, SteeringSpec((op,))))
    return rows


def run_clients(engine, rows: list) -> dict:
    """All rows as concurrent single-row requests: tokens, wall time and end-to-end tokens/s."""
    from infrastructure.engine.job import GenerationJob

    async def together():
        start = time.perf_counter()
        done = await asyncio.gather(*(engine.collect(GenerationJob([row])) for row in rows))
        return time.perf_counter() - start, [finished.completion_tokens for [finished] in done]

    wall, counts = asyncio.run(together())
    out = {"rows": len(rows), "tokens": sum(counts), "wall_s": wall, "tokens_per_s": sum(counts) / wall}
    return out | {"complete": all(c == rows[0].sampling.max_new_tokens for c in counts)}


def throughput(engine, loaded, spec: dict) -> dict:
    """One steered stream, then spec['clients'] concurrent ones. Per shape: a warm-up, a run of the same prompts
    to their first token only, the measured run; decode tokens/s = the extra tokens over the extra time."""
    out = {}
    for key, n in (("one", 1), ("many", spec["clients"])):
        run_clients(engine, steered_rows(loaded, n, spec, 8, 1))
        first = run_clients(engine, steered_rows(loaded, n, spec, 1, 2))
        for d in loaded.devices if loaded.device.type == "cuda" else ():
            torch.cuda.reset_peak_memory_stats(torch.device(d))
        out[key] = run_clients(engine, steered_rows(loaded, n, spec, spec["new_tokens"], 2))
        extra = out[key]["wall_s"] - first["wall_s"]
        rate = n * (spec["new_tokens"] - 1) / extra if extra > 0 else None
        out[key] |= {"first_token_s": first["wall_s"], "decode_tokens_per_s": rate}
    return out | {"mem_peak": gpu_memory(loaded)}


def child_measure(spec: dict) -> dict:
    from scripts.bench_archs import weight_bytes

    loaded = load_through_loader(spec)
    m = {"load_s": loaded.load_seconds, "quantization": loaded.quantization, "mem_load": gpu_memory(loaded)}
    engine = start_engine(loaded, spec)
    try:
        m |= throughput(engine, loaded, spec)
    finally:
        engine.stop()
    load, peak = m["mem_load"], m["mem_peak"]
    numbers = (weight_bytes(loaded.model), load.get("allocated"), load.get("used"), peak.get("peak_allocated"))
    numbers += (peak.get("used"), m["one"]["decode_tokens_per_s"], m["many"]["tokens_per_s"])
    return m | {"row": dict(zip((*MEMORY, "one", "many"), numbers))}


def child_main(spec_json: str, tasks: dict) -> int:
    # an exception exits 1 with its traceback, whose last line the parent reports
    spec = json.loads(spec_json)
    Path(spec["result"]).write_text(json.dumps(tasks[spec["task"]](spec), default=str))
    return 0


def run_child(module: str, spec: dict, log: Path, timeout: float, gpu: int | None = None):
    """Run one child (output in `log`), on one GPU if given: (result, None) or (None, the error's last line)."""
    if timeout < 5:
        return None, "SKIPPED: time budget spent"
    result, env = log.with_suffix(".json"), os.environ | ({} if gpu is None else {"CUDA_VISIBLE_DEVICES": str(gpu)})
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", module, "--child", json.dumps(spec | {"result": str(result)})]
    with log.open("w") as fh:
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s"
    if done.returncode == 0 and result.is_file():
        return json.loads(result.read_text()), None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return None, f"{lines[-1] if lines else 'no output'} (exit {done.returncode})"


class Report:
    """A markdown table and its raw numbers: rows print as they come, both files are rewritten after each."""

    def __init__(self, out: Path, stem: str, columns: str) -> None:
        self.out, self.stem, self.columns = out, stem, columns.split("|")
        self.device, self.notes, self.rows, self.lock = "", [], [], threading.RLock()
        self.date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        (out / "logs").mkdir(parents=True, exist_ok=True)  # where run_child writes

    def head(self) -> str:
        rule = "|---|---|" + "---:|" * (len(self.columns) - 3) + "---|"
        return f"**{self.device or '(device unknown)'}, {self.date}**\n\n| " + " | ".join(self.columns) + " |\n" + rule

    def add(self, key: tuple, cells: list, raw: dict) -> None:
        with self.lock:
            print(("" if self.rows else self.head() + "\n") + "| " + " | ".join(map(str, cells)) + " |", flush=True)
            self.rows.append((key, [str(c) for c in cells], raw))
            self.write()

    def write(self) -> None:
        with self.lock:
            rows = sorted(self.rows, key=lambda r: r[0])
            body = ["| " + " | ".join(cells) + " |" for _, cells, _ in rows]
            (self.out / f"{self.stem}.md").write_text("\n".join([self.head(), *body, "", *self.notes]).strip() + "\n")
            raw = {k: getattr(self, k) for k in ("device", "date", "notes")} | {"rows": [r[2] for r in rows]}
            (self.out / f"{self.stem}.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")


def row_cells(label: str, quant: str, f: dict, note: str) -> list[str]:
    pairs = (("load_alloc", "load_used"), ("peak_alloc", "peak_used"))
    mem = ["n/a (CPU)" if f[a] is None else f"{f[a] / 1e9:.1f} / {f[u] / 1e9:.1f}" for a, u in pairs]
    one, many = ("n/a" if f[k] is None else f"{f[k]:,.1f}" for k in ("one", "many"))
    return [label, quant, f"{f['weights'] / 1e9:.2f}", *mem, one, many, note]


def extrapolate(deep: dict, shallow: dict, n_deep: int, n_shallow: int, clients: int) -> tuple[dict, str]:
    """Straight line through two depths to BIG_LAYERS: memory, and seconds per step (tokens/s = rows/step)."""
    out, span, noisy = {}, n_deep - n_shallow, False
    for key in MEMORY:
        out[key] = None if deep[key] is None else deep[key] + (BIG_LAYERS - n_deep) * (deep[key] - shallow[key]) / span
    for key, rows in (("one", 1), ("many", clients)):
        per_layer = (rows / deep[key] - rows / shallow[key]) / span if deep[key] and shallow[key] else 0.0
        noisy |= per_layer <= 0
        out[key] = rows / (rows / deep[key] + (BIG_LAYERS - n_deep) * per_layer) if per_layer > 0 else None
    note = f"extrapolated: fixed part + {BIG_LAYERS} × per-layer part, from the {n_deep}- and {n_shallow}-layer rows"
    return out, note + ("; per-layer time ≤ 0 (noise), no tok/s" if noisy else "")


def half_folder(full: Path, layers: int) -> Path:
    """A folder whose config keeps the first `layers` layers, its other files symlinked to the full checkpoint."""
    half = Path(f"{full}-{layers}")
    shutil.copytree(full, half, copy_function=os.symlink, ignore=shutil.ignore_patterns("config.json"))
    config = json.loads((full / "config.json").read_text()) | {"num_hidden_layers": layers}
    (half / "config.json").write_text(json.dumps(config, indent=2))
    return half


def run_arch(arch: str, gpu: int | None, args: argparse.Namespace, report: Report, deadline: float) -> None:
    """Build and save, measure every quantisation (two depths for the 70B shape), delete the checkpoint."""
    spec = base_spec(args)
    big, name, tmp = arch == BIG, f"{arch} (tiny)" if args.tiny else arch, Path(tempfile.mkdtemp(prefix="bench_hw_"))
    at = args.archs.index(arch)  # table order: --archs order, then quantisation, then depth

    def child(log: str, **task):
        left = min(args.timeout, deadline - time.monotonic())
        return run_child(__spec__.name, spec | task, args.out / "logs" / f"{arch}-{log}.log", left, gpu)

    try:
        built, error = child("build", task="build", arch=arch, layers=args.layers_70b if big else None, dir=str(tmp))
        report.device = report.device or (built or {}).get("device_name", "")
        depths = [(built["layers"], tmp)] if built else []
        if built and big:
            depths.append((built["layers"] // 2, half_folder(tmp, built["layers"] // 2)))
        for qi, quant in enumerate(args.quantizations):
            if error:
                report.add((at, qi, 0), [name, quant, *["—"] * 5, f"FAILED: build: {error}"], {"error": error})
            measured = {}
            for di, (layers, folder) in enumerate(depths):
                label = f"{name}, {layers} of {BIG_LAYERS} layers" if big else name
                m, err = child(f"{layers}-{quant}", task="measure", dir=str(folder), quantization=quant)
                raw = {"arch": arch, "layers": layers, "quantization": quant, "gpu": gpu} | (m or {"error": err})
                if err:
                    report.add((at, qi, di), [label, quant, *["—"] * 5, f"FAILED: {err}"], raw)
                    continue
                measured[layers] = m["row"]
                note = f"load {m['load_s']:.0f} s; decode {m['many']['decode_tokens_per_s'] or 0:,.0f} tok/s"
                note += "" if m["one"]["complete"] and m["many"]["complete"] else "; INCOMPLETE: rows ended early"
                report.add((at, qi, di), row_cells(label, m["quantization"], m["row"], note), raw)
            if len(measured) == 2:
                (deep, f_deep), (shallow, f_shallow) = sorted(measured.items(), reverse=True)
                f, note = extrapolate(f_deep, f_shallow, deep, shallow, args.clients)
                cells = row_cells(f"{name}, {BIG_LAYERS} layers (extrapolated)", quant, f, note)
                report.add((at, qi, 9), cells, {"arch": arch, "quantization": quant, "extrapolated": f})
    finally:
        for folder in (tmp, Path(f"{tmp}-{args.layers_70b // 2}")):
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child_main(args.child, {"build": child_build, "measure": child_measure})
    started, deadline = time.monotonic(), time.monotonic() + args.budget
    report, n = Report(args.out, "bench_hardware", COLUMNS.format(n=args.clients) + "tok/s|note"), args.clients
    report.notes.append(
        f"`python {' '.join(sys.argv)}`: random weights (seed 0) saved as safetensors, loaded by `load_model` "
        f"(MODEL_NAME=<folder>, QUANTIZATION as shown), PersonaEngine(max_batch_size={max(64, n)}, "
        f"**{json.dumps(args.engine_args)}); {args.prompt_tokens}-token prompts, {args.new_tokens} forced new tokens, "
        f"each request steered by its own unit vector × {args.strength:g} at layer n/2. GB = 10⁹ bytes; memory = "
        f"torch allocated / device used (mem_get_info), at {n} requests the peak allocated. 1-stream = decode "
        f"tokens/s of one request; {n}-client = tokens ÷ wall time of {n} concurrent single-row requests (prefill "
        f"included)."
    )
    todo = sorted(args.archs, key=lambda a: ARCHS[a]["hidden_size"])  # popped from the end: widest (longest) first
    gpus = range(min(args.gpus or torch.cuda.device_count(), len(todo))) if args.device == "cuda" else [None]

    def worker(gpu: int | None) -> None:
        while True:
            with report.lock:
                if not todo:
                    return
                arch = todo.pop()
            run_arch(arch, gpu, args, report, deadline)

    with ThreadPoolExecutor(len(gpus)) as pool:
        list(pool.map(worker, gpus))
    report.notes.append(f"Total {time.monotonic() - started:.0f} s; configurations ran {len(gpus)} at a time.")
    report.write()
    print("\n" + "\n".join([*report.notes, f"table: {args.out / 'bench_hardware.md'}, raw numbers: .json beside it"]))
    return 0 if all("error" not in raw for _, _, raw in report.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
