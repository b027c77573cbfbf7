"""Per-GEMM times of the 4-bit kernels on an arch's real layer shapes (issue 15): GemLite (as the repacked model
runs it: merged q/k/v and gate/up) vs gptqmodel's AWQ Triton kernel (the library's default plan) vs fp16 cuBLAS.

    python -m scripts.bench_gemlite --arch llama-3.3-70b --rows 1,64 --out OUT/gemm.json            # GPU
    python -m scripts.bench_gemlite --arch llama-3.3-70b --rows 1 --tune --out OUT/gemm.json        # + autotune
    python -m scripts.bench_gemlite --arch tiny-llama --rows 1,4 --device cpu --out /tmp/gemm.json   # CPU: the flow
    python -m scripts.bench_gemlite --arch llama-3.3-70b --rows 1,4,16,64 --torch-int4 --out OUT/gemm.json  # + tinygemm
    python -m scripts.bench_gemlite --arch llama-3.3-70b --rows 1,16,64 --marlin --out OUT/gemm.json     # + Marlin
    python -m scripts.bench_gemlite --arch llama-3.3-70b --rows 256,1024,8192 --marlin --out OUT/prefill.json

Random AWQ "gemm" tensors per shape (several copies, more bytes than the L2 cache, cycled), unpacked and packed
for GemLite as `infrastructure/quant_gemlite.py` does at load; GemLite's configs settled as at load
(`infrastructure/gemlite_configs.py`: shipped family file + nearest-shape fill, no autotuning). Each kernel is
timed as a CUDA graph of many calls (output allocation included). Columns: microseconds per call and effective
TB/s (packed 4-bit weights + float16 scales and zeros / time; fp16: the float16 weight), and GemLite's largest
error against the dequantised weight in float32 relative to the output's largest magnitude. `--tune` then
autotunes GemLite for the same shapes and rows (Triton's autotuner, GemLite's "fast" candidates), times again,
and writes the chosen configs of these shapes to --tune-out (the per-GPU file `gemlite_configs.settle` loads).
`--marlin` adds gptqmodel's AWQ Marlin module on the same tensors (its own repacking at `post_init`; the library
compiles its CUDA extension with nvcc on first use, minutes: the build time is in the report), and the route
MarlinLinear takes from quant_marlin.DENSE_FROM_ROWS rows: the weight dequantised (`dequantise_us`, Triton)
then multiplied on cuBLAS (`marlin_dense_us`, both together).
The report is rewritten after every shape (a cut run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from infrastructure.quant_gemlite import DequantisedLinear, QuantParts, build_linear, unpack_awq_gemm

GROUP = 128
L2_BYTES = 200 * 2**20


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-3.3-70b")
    p.add_argument("--rows", default="1,64")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--tune", action="store_true", help="also autotune GemLite on these shapes and rows")
    p.add_argument("--tune-out", type=Path, default=None, help="where the tuned configs go (JSON)")
    p.add_argument("--budget-s", type=float, default=1e9)
    p.add_argument("--variants", default="", help="GemLite kernels also timed by name, e.g. GEMM_SPLITK,GEMM")
    p.add_argument("--torch-int4", action="store_true", help="also time torch's own int4 kernel (tinygemm)")
    p.add_argument("--marlin", action="store_true", help="also time gptqmodel's AWQ Marlin kernel (built on first use)")
    args = p.parse_args(argv)
    if args.marlin and args.device != "cuda":
        p.error("--marlin needs a GPU (gptqmodel's Marlin kernels are CUDA only)")
    return args


def shapes(arch: str) -> dict[str, tuple[int, int]]:
    """(N out, K in) of what the repacked model multiplies: merged qkv, o, merged gate_up, down."""
    from scripts.bench_archs import projection_widths
    from scripts.make_quantized_checkpoint import build_config

    c = build_config(arch, 1)
    q, kv = projection_widths(c)
    return {
        "qkv": (q + 2 * kv, c.hidden_size),
        "o": (c.hidden_size, q),
        "gate_up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
    }


def torch_int4(parts: QuantParts, device: str):
    """torch's own 4-bit kernel (tinygemm, `aten._weight_int4pack_mm`; `_for_cpu` on the CPU) on the same parts, as
    a candidate beside GemLite: it takes W = (q - 8) * scale + zero in bfloat16, so AWQ's zero z becomes
    (8 - z) * scale. Returns fn(x) -> x @ W.t() (x cast to bfloat16)."""
    scales, zeros = parts.scales.float(), parts.zeros.float()
    table = torch.stack([scales, (8 - zeros) * scales], 2).transpose(0, 1).contiguous().to(torch.bfloat16)
    codes = parts.codes.to(torch.int32)
    if device == "cuda":
        packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
        return lambda x: torch._weight_int4pack_mm(x.to(torch.bfloat16), packed, parts.group, table)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    return lambda x: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, parts.group, table)


def build_marlin() -> float:
    """Compile (or load from its cache) gptqmodel's float16 Marlin extension; seconds taken."""
    from infrastructure.quant_marlin import build_marlin as build

    started = time.perf_counter()
    build()
    return time.perf_counter() - started


def awq_copies(n: int, k: int, copies: int, device: str) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(copies):
        out.append({
            "qweight": torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device),
            "qzeros": torch.randint(-(2**31), 2**31 - 1, (k // GROUP, n // 8), dtype=torch.int32, device=device),
            "scales": (torch.rand(k // GROUP, n, device=device) * 1e-3).half(),
        })  # fmt: skip
    return out


def timed(fn, reps: int, device: str) -> float:
    """Microseconds per fn(i): a CUDA graph of `reps` calls on a GPU, wall time on the CPU."""
    if device != "cuda":
        started = time.perf_counter()
        for i in range(reps):
            fn(i)
        return (time.perf_counter() - started) * 1e6 / reps
    from scripts.tune_awq_tiles import time_graph

    return time_graph(fn, reps)


def measure(name: str, n: int, k: int, rows: int, args) -> dict:
    """One shape at one row count: GemLite, gptqmodel's Triton (GPU only) and fp16, with bytes and errors."""
    device = args.device
    packed_bytes = k * n // 2 + (k // GROUP) * n * 4  # codes + float16 scales and zeros
    copies = max(2, min(8, L2_BYTES // packed_bytes))
    weights = awq_copies(n, k, copies, device)
    parts = []  # each copy unpacked once: GemLite, the reference and torch's int4 kernel take the same parts
    for w in weights:
        codes, zeros, scales = unpack_awq_gemm(w["qweight"], w["qzeros"], w["scales"], GROUP)
        parts.append(QuantParts(codes, scales, zeros, None, GROUP))
    if device == "cuda":
        from infrastructure.quant_gemlite import gemlite_class

        cls = gemlite_class()
    else:
        cls = DequantisedLinear
    lins = [build_linear(p, cls) for p in parts]
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(rows, k, device=device, dtype=dtype)
    out: dict = {"shape": name, "n": n, "k": k, "rows": rows, "packed_mb": packed_bytes / 1e6}
    out["gemlite_us"] = timed(lambda i: lins[i % len(lins)](x), args.reps, device)
    reference = x.float() @ parts[0].dequantise().t()
    error = (lins[0](x).float() - reference).abs().max() / reference.abs().max()
    out["gemlite_rel_error"] = float(error)
    if args.torch_int4:  # torch's tinygemm on the same weights (its own packing; bfloat16 activations)
        int4 = [torch_int4(p, device) for p in parts]
        out["torch_int4_us"] = timed(lambda i: int4[i % len(int4)](x), args.reps, device)
        out["torch_int4_tbps"] = packed_bytes / out["torch_int4_us"] / 1e6
        out["torch_int4_rel_error"] = float((int4[0](x).float() - reference).abs().max() / reference.abs().max())
    if args.marlin:  # the library's Marlin on the same AWQ tensors
        from infrastructure.quant_marlin import awq_marlin_module

        marlin = [awq_marlin_module(w, k, n, GROUP) for w in weights]
        out["marlin_us"] = timed(lambda i: marlin[i % len(marlin)](x), args.reps, device)
        out["marlin_rel_error"] = float((marlin[0](x).float() - reference).abs().max() / reference.abs().max())
        del marlin
        from infrastructure.quant_marlin import MarlinLinear  # its prefill route: dequantised, then cuBLAS

        lin = build_linear(parts[0], MarlinLinear)
        if lin.layout is not None:
            out["dequantise_us"] = timed(lambda i: lin.dequantised(), args.reps, device)
            out["marlin_dense_us"] = timed(lambda i: x @ lin.dequantised(), args.reps, device)
            got = (x @ lin.dequantised()).float()
            out["marlin_dense_rel_error"] = float((got - reference).abs().max() / reference.abs().max())
        else:
            out["marlin_dense_error"] = "no dense layout (see the log)"
        del lin
    if device == "cuda":
        from gemlite import core
        from gemlite.triton_kernels.utils import get_closest_m
        from gptqmodel.quantization.awq.modules.triton.gemm import awq_gemm_triton

        from infrastructure.gemlite_configs import signature

        for kind in filter(None, args.variants.split(",")):  # GemLite's other kernels at this row count
            if signature(get_closest_m(rows), n, k, GROUP) not in core.GEMLITE_TRITON_CONFIG_CACHE.get(kind, {}):
                continue  # no settled config: it would autotune
            try:
                out[f"gemlite_{kind}_us"] = timed(
                    lambda i, kind=kind: lins[i % len(lins)].forward_manual(x, kind), args.reps, device
                )
                got = lins[0].forward_manual(x, kind).float()
                out[f"gemlite_{kind}_rel_error"] = float((got - reference).abs().max() / reference.abs().max())
            except Exception as exc:  # noqa: BLE001 - recorded
                out[f"gemlite_{kind}_error"] = f"{type(exc).__name__}: {exc}"[:300]

        def triton(i: int):  # the library's default plan on GPUs its rule table lacks: 32x32x32, split-K 8
            w = weights[i % len(weights)]
            return awq_gemm_triton(x, w["qweight"], w["scales"], w["qzeros"], 8, output_dtype=x.dtype)

        try:
            out["gptqmodel_triton_us"] = timed(triton, args.reps, device)
        except Exception as exc:  # noqa: BLE001 - recorded; the other columns stand
            out["gptqmodel_triton_error"] = f"{type(exc).__name__}: {exc}"[:300]
        dense = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(max(1, min(4, L2_BYTES // (2 * n * k))))]
        out["fp16_cublas_us"] = timed(lambda i: x @ dense[i % len(dense)].t(), args.reps, device)
    for key in ("gemlite", "gptqmodel_triton", "marlin", "marlin_dense"):
        if f"{key}_us" in out:
            out[f"{key}_tbps"] = packed_bytes / out[f"{key}_us"] / 1e6
    if "fp16_cublas_us" in out:
        out["fp16_cublas_tbps"] = 2 * n * k / out["fp16_cublas_us"] / 1e6
    out["_lins"] = lins
    return out


def forget_triton_choices() -> int:
    """Clear the choices Triton's autotuners already made for GemLite's kernels (per key, in memory): without
    this the first timed call's settled config stays chosen and "tuning" re-times it. Returns how many were
    cleared."""
    import importlib
    import pkgutil

    import gemlite.triton_kernels as kernels
    from triton.runtime.autotuner import Autotuner

    cleared = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Autotuner) and value.cache:
                cleared += len(value.cache)
                value.cache.clear()
    return cleared


def tune(row: dict, args) -> dict:
    """Drop GemLite's configs of this shape and row bucket, let Triton autotune them, time again."""
    from gemlite import core
    from gemlite.triton_kernels.utils import get_closest_m

    from infrastructure.gemlite_configs import signature

    kernel = core.get_matmul_type(row["rows"], 4, False)
    key = signature(get_closest_m(row["rows"]), row["n"], row["k"], GROUP)
    core.GEMLITE_TRITON_CONFIG_CACHE.get(kernel, {}).pop(key, None)
    cleared = forget_triton_choices()
    started = time.perf_counter()
    lins = row["_lins"]
    x = torch.randn(row["rows"], row["k"], device="cuda", dtype=torch.float16)
    lins[0](x)
    torch.cuda.synchronize()
    tuned = {"kernel": kernel, "signature": key, "autotune_s": time.perf_counter() - started, "cleared": cleared}
    tuned["us"] = timed(lambda i: lins[i % len(lins)](x), args.reps, "cuda")
    tuned["tbps"] = row["packed_mb"] / tuned["us"]
    return tuned


def tuned_configs(keys: list[tuple[str, str]], scratch: Path) -> dict:
    """The autotuned configs of these (kernel, signature) pairs, in GemLite's file format (via its cache_config)."""
    import gemlite

    scratch.unlink(missing_ok=True)
    gemlite.cache_config(str(scratch))
    everything = json.loads(scratch.read_text())
    out: dict = {}
    for kernel, key in keys:
        if key in everything.get(kernel, {}):
            out.setdefault(kernel, {})[key] = everything[kernel][key]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": " ".join(sys.argv), "arch": args.arch, "rows": []}
    if args.device == "cuda":
        from infrastructure.gemlite_configs import settle_shapes

        report["device"] = torch.cuda.get_device_name(0)
        report["configs"] = settle_shapes({(n, k, GROUP) for n, k in shapes(args.arch).values()}, None)
    if args.marlin:
        report["marlin_build_s"] = build_marlin()
        print(f"Marlin extension ready in {report['marlin_build_s']:.0f} s", flush=True)
    save = lambda: args.out.write_text(json.dumps(report, indent=2, default=str))  # noqa: E731
    configs: dict = {}  # the tuned configs, GemLite's file format
    scratch = args.out.with_name("gemlite_all_configs.json")
    plan = [
        (rows, name, n, k)
        for rows in (int(r) for r in args.rows.split(","))
        for name, (n, k) in shapes(args.arch).items()
    ]
    for rows, name, n, k in plan:
        if time.perf_counter() - started > args.budget_s:
            report["cut"] = f"budget of {args.budget_s:.0f} s spent"  # what was tuned is still written below
            break
        try:
            row = measure(name, n, k, rows, args)
            if args.tune and args.device == "cuda":
                row["tuned"] = tune(row, args)  # read now: the next shape's tuning clears the autotuners' choices
                found = tuned_configs([(row["tuned"]["kernel"], row["tuned"]["signature"])], scratch)
                for kernel, chosen in found.items():
                    configs.setdefault(kernel, {}).update(chosen)
        except Exception as exc:  # noqa: BLE001 - a failing kernel is a finding: recorded, the rest runs
            row = {"shape": name, "n": n, "k": k, "rows": rows, "error": f"{type(exc).__name__}: {exc}"[:1500]}
        row.pop("_lins", None)
        report["rows"].append(row)
        print(json.dumps(row, default=str), flush=True)
        save()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.tune and args.device == "cuda":
        target = args.tune_out or args.out.with_name("gemlite_tuned.json")
        target.write_text(json.dumps(configs, indent=1))
        report["tuned_configs"] = str(target)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
