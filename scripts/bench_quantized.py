"""Seed 000's own model on one GPU (issue 15): 4-bit checkpoints built, loaded, served and timed in one run.

    python -m scripts.bench_quantized --work /data/q --out results/            # GPU: the README rows
    pipenv run python -m scripts.bench_quantized --rows tiny-llama:awq,tiny-llama:gptq,tiny-llama:bnb-4bit \
        --device cpu --clients 4 --prompt-tokens 16 --new-tokens 8 --work /tmp/q --out /tmp/q   # CPU smoke

Per row ARCH:FORMAT (FORMAT awq | gptq: a synthetic checkpoint from scripts.make_quantized_checkpoint, built
on --device; bf16: a random bfloat16 checkpoint, the baseline; bnb-4bit: a random float16 checkpoint loaded
with QUANTIZATION=bnb-4bit), in order, while --budget-s lasts (tiny-llama rows also compare the logits with
the checkpoint dequantised into a plain model: the GPU kernels' correctness):
  1. build the checkpoint into --work (deleted after its row: the 64 GB disk holds one 70B at a time);
  2. load it as the server does (OVERRIDE_MODEL_ID=folder, MODEL_ID=the seed's id for the row) and time it;
  3. start the engine (paged, CUDA graphs) and the HTTP server; a synthetic assistant-axis file at the seed's
     layer (40 of 80) is in PERSONA_DATA_PATH; seed 000's example request (an 8,192-float vector at
     blocks.40.hook_resid_post on the 70B) goes to /v1/steer/completion-chat and to /runsync;
  4. one steered stream, then --clients concurrent ones with distinct vectors (scripts.bench_hardware's
     workloads: decode tokens/s over the extra tokens), and GPU memory at the end of the concurrent run.
Each row runs in its own process (the GPU is clean for the next; --deadline-s cuts one that runs long), which
writes OUT/row-ARCH-FORMAT.json as soon as each number exists; OUT/bench_quantized.json gathers the rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import httpx
import torch

SEED_IDS = {
    ("llama-3.3-70b", "awq"): "casperhansen/llama-3.3-70b-instruct-awq",
    ("qwen2.5-7b", "awq"): "Qwen/Qwen2.5-7B-Instruct-AWQ",
    ("qwen2.5-7b", "gptq"): "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4",
    ("qwen2.5-7b", "bnb-4bit"): "Qwen/Qwen2.5-7B-Instruct",
    ("qwen2.5-7b", "bf16"): "Qwen/Qwen2.5-7B-Instruct",
}
DEFAULT_ROWS = "tiny-llama:awq,tiny-llama:gptq,llama-3.3-70b:awq,qwen2.5-7b:awq,qwen2.5-7b:gptq,qwen2.5-7b:bf16"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated ARCH:FORMAT, run in order")
    p.add_argument("--work", type=Path, required=True, help="where checkpoints are written (one at a time)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256, help="per client: 64 x (256 + 256) = 64 x 512 tokens")
    p.add_argument("--seed-tokens", type=int, default=64, help="n_completion_tokens of seed 000's request")
    p.add_argument("--strength", type=float, default=8.0)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no row after this many seconds")
    p.add_argument("--deadline-s", type=float, default=1e9, help="stop a row's process at this many seconds")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # the child process of one row
    p.add_argument("--no-graphs", action="store_true", help="paged engine without CUDA graphs")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the embedded model's)")
    p.add_argument(
        "--quant-kernel", default="auto", help="QUANT_KERNEL for the awq / gptq rows (auto: GemLite on CUDA)"
    )
    return p.parse_args(argv)


def build_checkpoint(arch: str, fmt: str, folder: Path, device: str, tokenizer) -> dict:
    if fmt in ("awq", "gptq"):
        from scripts.make_quantized_checkpoint import build

        return build(fmt, arch, folder, device=device, tokenizer=tokenizer)
    from scripts.bench_archs import build_random_model, weight_bytes
    from scripts.make_quantized_checkpoint import TINY_LLAMA

    started = time.perf_counter()
    name, overrides = ("llama-3.3-70b", TINY_LLAMA) if arch == "tiny-llama" else (arch, None)
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float16
    model, _ = build_random_model(name, None, device, tokenizer, dtype, overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = {"format": fmt, "arch": arch, "bytes": weight_bytes(model), "seconds": time.perf_counter() - started}
    del model
    return out


def axis_folder(root: Path, logical: str, hidden: int, layer: int) -> Path:
    """PERSONA_DATA_PATH with a synthetic assistant axis (a random unit direction) at `layer`."""
    from infrastructure.persona.axis_data import model_folder, save_axis

    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    direction /= direction.norm()
    meta = {"axis_layer": layer, "model_id": logical, "pc_title": "- Role-playing ↔️ + Assistant-like"}
    save_axis(model_folder(root, logical), {"monitor_direction": direction, "monitor_center": 0 * direction}, meta)
    return root


def seed_request(hidden: int, layer: int, tokens: int) -> dict:
    """Seed 000's README example with a full-size vector (8,192 floats on the 70B)."""
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(42)) * 0.05
    return {
        "prompt": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello, how are you?"},
        ],
        "types": ["STEERED"],
        "vectors": [{"hook": f"blocks.{layer}.hook_resid_post", "strength": 1.0, "steering_vector": vector.tolist()}],
        "strength_multiplier": 1.0,
        "seed": 42,
        "temperature": 0.7,
        "freq_penalty": 0.0,
        "n_completion_tokens": tokens,
        "steer_method": "SIMPLE_ADDITIVE",
        "normalize_steering": False,
        "steer_special_tokens": False,
    }


def http_checks(url: str, body: dict) -> dict:
    """The seed request through both routes: status, wall time, output size and the axis frame."""
    out = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        for name, path, payload in (
            ("completion_chat", "/v1/steer/completion-chat", body | {"stream": False}),
            ("runsync", "/runsync", {"input": body}),
        ):
            started = time.perf_counter()
            r = client.post(path, json=payload)
            result = {"status": r.status_code, "wall_s": time.perf_counter() - started}
            data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            data = data.get("output", data) if name == "runsync" else data
            if isinstance(data, list):  # RunPod's output: the streamed chunks, the last one is the final frame
                data = data[-1] if data else {}
            outputs = data.get("outputs") or []
            result["chars"] = len(outputs[0]["chat_template"][-1]["content"]) if outputs else None
            result["axis_turns"] = len((data.get("assistant_axis") or [{}])[0].get("turns", []))
            result["body_head"] = r.text[:300] if r.status_code != 200 or not outputs else None
            out[name] = result
    return out


def logit_error(loaded, folder: Path) -> list[float]:
    """(max |logits - reference|, max |reference|) against the checkpoint dequantised into a plain model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from scripts.quantized_layout import dequantised_state_dict

    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    with torch.device(loaded.device):
        plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(dequantised_state_dict(folder))
    ids = torch.tensor([[1, 520, 3300, 1200, 77, 9000, 431, 12, 4000, 2]], device=loaded.device)
    with torch.no_grad():
        a, b = loaded.model(ids).logits.float(), plain(ids).logits.float()
    return [float((a - b).abs().max()), float(b.abs().max())]


def measure_row(arch: str, fmt: str, args: argparse.Namespace, tokenizer, report: dict) -> None:
    from app.factory import create_app
    from app.runtime import Runtime
    from app.settings import Settings
    from infrastructure.model_loader import load_model
    from scripts.bench_client import ServerThread
    from scripts.bench_hardware import gpu_memory, start_engine, throughput

    row = report["rows"].setdefault(f"{arch}:{fmt}", {})
    save = lambda: args.report_file.write_text(json.dumps(report, indent=2, default=str))  # noqa: E731
    folder = args.work / f"{arch}-{fmt}"
    shutil.rmtree(folder, ignore_errors=True)
    row["build"] = build_checkpoint(arch, fmt, folder, args.device, tokenizer)
    save()
    logical = SEED_IDS.get((arch, fmt), f"synthetic/{arch}-{fmt}")
    quantization = "bnb-4bit" if fmt == "bnb-4bit" else "none"
    fields = dict(override_model_id=str(folder), model_id=logical, device=args.device, quantization=quantization)
    fields["quant_kernel"] = args.quant_kernel
    config = json.loads((folder / "config.json").read_text())
    layer = config["num_hidden_layers"] // 2  # 40 of the 70B's 80: seed 000's hook and axis layer
    persona = axis_folder(args.work / "persona", logical, config["hidden_size"], layer)
    settings = Settings(_env_file=None, persona_data_path=persona, log_format="text", log_level="WARNING", **fields)
    loaded = load_model(settings)
    row |= {"load_s": loaded.load_seconds, "dtype": str(loaded.dtype), "quantization": loaded.quantization}
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]  # 4-bit modules keep their weights in buffers
    row["model_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    row["kernel"] = type(loaded.model.model.layers[0].mlp.down_proj).__name__
    row["quant_kernel"] = loaded.quant_kernel
    layouts = [m.layout is not None for m in loaded.model.modules() if hasattr(m, "layout") and hasattr(m, "inner")]
    if layouts:  # Marlin modules: how many take prefill-sized products dequantised on cuBLAS
        row["dense_prefill_modules"] = f"{sum(layouts)}/{len(layouts)}"
    # the tile plans infrastructure.quant_tiles registered at load (gptqmodel's Triton kernel only)
    if fmt == "awq" and args.device == "cuda" and loaded.quant_kernel != "gemlite":
        from infrastructure.quant_tiles import awq_shapes, load_table, plans_for, shape_key

        name, table = torch.cuda.get_device_name(0), load_table()
        row["awq_tiles"] = {shape_key(n, k): plans_for(table, name, n, k) for n, k, _ in awq_shapes(loaded.model)}
    row["mem_load"] = gpu_memory(loaded)
    if arch == "tiny-llama" and fmt in ("awq", "gptq"):
        row["max_logit_error"] = logit_error(loaded, folder)
    save()
    spec = {"clients": args.clients, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    spec |= {"strength": args.strength, "engine_args": {"cuda_graphs": not args.no_graphs}}
    started = time.perf_counter()
    engine = start_engine(loaded, spec)
    row["engine_start_s"] = time.perf_counter() - started
    row["engine_warmup_s"] = getattr(engine, "warmup_seconds", None)  # incl. every decode bucket's capture
    save()
    try:
        runtime = Runtime(settings, owns_engine=False)
        runtime.attach(loaded, engine)
        row["axis"] = {"layer": runtime.axis.layer if runtime.axis else None, "problem": runtime.axis_problem}
        with ServerThread(create_app(runtime=runtime)) as server:
            row["seed_000"] = http_checks(server.url, seed_request(loaded.hidden_size, layer, args.seed_tokens))
        save()
        row |= throughput(engine, loaded, spec)
        per_token = getattr(engine, "kv_bytes_per_token", 0)
        tokens = args.clients * (args.prompt_tokens + args.new_tokens)
        row["kv"] = {"bytes_per_token": per_token, "gb_at_clients": per_token * tokens / 1e9} | engine.kv_stats()
        graphs = getattr(engine, "_graphs", None)
        row["cuda_graphs"] = {"captures": graphs.captures, "replays": graphs.replays} if graphs else None
    finally:
        engine.stop()
        shutil.rmtree(folder, ignore_errors=True)
    save()


def run_row(item: str, args: argparse.Namespace) -> int:
    """Child process: one row, its numbers in OUT/row-ARCH-FORMAT.json (the GPU is clean when it exits)."""
    from transformers import AutoTokenizer

    from app.settings import Settings
    from infrastructure.embedded import ensure_embedded

    arch, fmt = item.split(":")
    source = args.tokenizer or ensure_embedded(Settings(_env_file=None).model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    report: dict = {"rows": {}}
    try:
        measure_row(arch, fmt, args, tokenizer, report)
    except Exception as exc:  # the row's failure is a finding: recorded, and the next row still runs
        report["rows"].setdefault(item, {})["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
    args.report_file.write_text(json.dumps(report, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.row:
        args.report_file = args.out / f"row-{args.row.replace(':', '-')}.json"
        return run_row(args.row, args)
    started = time.perf_counter()
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    report = {"command": " ".join(sys.argv), "device": device, "torch": torch.__version__, "rows": {}}
    for item in args.rows.split(","):
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            report["rows"][item] = {"skipped": f"budget of {args.budget_s:.0f} s spent"}
            continue
        row_file = args.out / f"row-{item.replace(':', '-')}.json"
        try:
            timeout = max(args.deadline_s - elapsed, 1)
            subprocess.run([sys.executable, "-m", "scripts.bench_quantized", *argv, "--row", item], timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"[bench_quantized] {item}: cut at the {args.deadline_s:.0f} s deadline", flush=True)
        row = json.loads(row_file.read_text())["rows"].get(item, {}) if row_file.is_file() else {}
        report["rows"][item] = row | {"row_s": time.perf_counter() - started - elapsed}
        print(f"[bench_quantized] {item}: {json.dumps(report['rows'][item], default=str)[:2500]}", flush=True)
        (args.out / "bench_quantized.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
