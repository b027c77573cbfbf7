"""COMPILE: the paged engine's fused, compiled decode step, prepared and warmed up at start-up.

- `off`: the model runs transformers' own layers (eager kernels, captured as CUDA graphs on a GPU);
- `merge`: merged q/k/v and gate/up projections and the fused layer forward (`fusion.py`), eager;
- `on`: the same with the layer functions and the steering function `torch.compile`d (Inductor), so the
  decode step's CUDA graphs hold fused norm / rotary / activation / steering kernels;
- `auto`: `on` where decode steps are CUDA graphs (one CUDA GPU; bf16/fp16, AWQ or GPTQ weights), `off`
  elsewhere (the CPU stays eager: compiling costs more than it saves for CI-sized runs).

Steering tables are tensor inputs of the compiled steering function, and in a CUDA graph they live in
fixed buffers refilled by copy: a new vector never recompiles anything; only a new steering *layout*
(add / number of caps / orthogonal decompositions at a site) compiles one more small graph, and
`warm_up` compiles the common ones at start-up. Compiled code is cached on disk (Inductor's FX graph and
Triton caches under `cache_dir`), so a restart skips code generation.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from infrastructure.engine.fusion import (
    FUSED_MARK,
    fuse_model,
    product_module,
    raise_recompile_limit,
    weight_and_bias,
)
from infrastructure.steering.hooks import apply_table
from infrastructure.steering.sites import decoder_layers

log = logging.getLogger(__name__)

MODES = ("auto", "on", "merge", "off")
BACKEND = "inductor"  # torch.compile's backend (tests count compiles with a backend of their own)
_STEERING: dict[str, object] = {}


def resolve_compile(setting: str, device: torch.device, one_gpu: bool, quantization: str) -> str:
    """auto -> on for one CUDA GPU running bf16/fp16 weights or AWQ / GPTQ (decode steps are CUDA graphs there;
    4-bit layers repacked for GemLite compile the pieces between their products), off otherwise (the CPU,
    bitsandbytes, layers split over GPUs); explicit values are kept. Under tensor parallelism each rank is one
    GPU (`one_gpu`): its shards compile like a whole model's."""
    if setting not in MODES:
        raise ValueError(f"COMPILE must be one of {', '.join(MODES)}, not {setting!r}")
    if setting != "auto":
        return setting
    return "on" if device.type == "cuda" and one_gpu and quantization in ("none", "awq", "gptq") else "off"


def compiled_steering(backend=BACKEND):
    """`apply_table` compiled once per process (tables are inputs: new vectors reuse the graph)."""
    if backend not in _STEERING:
        raise_recompile_limit()
        _STEERING[backend] = torch.compile(apply_table, backend=backend, fullgraph=True)
    return _STEERING[backend]


def use_cache_dir(cache_dir: str | os.PathLike | None) -> None:
    """Point Inductor's on-disk caches (FX graphs, Triton kernels) at `cache_dir` unless the environment
    already chose one (TORCHINDUCTOR_CACHE_DIR)."""
    if cache_dir is None or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    os.makedirs(cache_dir, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)


def prepare(model: torch.nn.Module, mode: str, cache_dir=None, backend=None):
    """Apply COMPILE's mode to the model (fusion is idempotent). Returns the steering function to use in
    forwards (None: the plain eager one)."""
    if mode == "off":
        return None
    backend = backend or BACKEND
    if mode == "on":
        use_cache_dir(cache_dir)
        raise_recompile_limit()  # dynamo's config is per thread: set it in the thread that will run the model
    fused = fuse_model(model, compile=mode == "on", backend=backend)
    log.info("COMPILE=%s: %d decoder layers fused (merged q/k/v and gate/up projections)", mode, fused)
    return compiled_steering(backend) if mode == "on" else None


def set_up(model: torch.nn.Module, mode: str, dtype: torch.dtype, max_rows: int, cache_dir=None) -> tuple:
    """Prepare the model for a resolved mode and check that compiling works here (else fall back to `merge`).
    Returns (mode in effect, the steering function for forwards or None)."""
    steer = prepare(model, mode, cache_dir)
    device = model.get_input_embeddings().weight.device
    if mode == "on" and not compiles_here(model, steer, device, dtype, max_rows):
        return "merge", prepare(model, "merge")
    return mode, steer


def warm_steering(steer, hidden_size: int, device: torch.device, dtype: torch.dtype, max_rows: int) -> None:
    """Compile the steering function's common layouts (an add; one cap; one orthogonal decomposition; one
    capture) for one token and for many, with the tables laid out as the engine lays them out (per-token
    copies in eager steps, slices of the fixed [1, max_rows, ...] buffers in CUDA graphs)."""
    if steer is None:
        return

    def eager_table(tokens: int, last: int, kind=dtype) -> torch.Tensor:  # runner.per_token: index_select, T
        return torch.randn(tokens, 1, last, device=device, dtype=kind).transpose(0, 1)

    def graph_table(tokens: int, last: int, kind=dtype) -> torch.Tensor:  # DecodeGraphs: fixed buffer, sliced
        return torch.randn(1, max_rows, last, device=device, dtype=kind)[:, :tokens]

    for tokens in (1, 2, 3):
        hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=dtype)
        mask = torch.ones(1, tokens, 1, device=device, dtype=dtype)
        for table in (eager_table, graph_table):
            vec, scalar = table(tokens, hidden_size), table(tokens, 1)
            direction = table(tokens, hidden_size, torch.float32)
            # called as the site hook calls it (`make_site_hook`): SiteTable's lists, captures included (a tuple
            # or a missing argument is another guard, and the first request would compile)
            steer(hidden, mask, vec, [], [], [])
            steer(hidden, mask, None, [], [(vec, scalar)], [])
            steer(hidden, mask, None, [(vec, scalar)], [], [])
            steer(hidden, None, None, [], [], [direction])  # a capture alone (assistant-axis monitoring)
            steer(hidden, mask, vec, [], [], [direction])  # steered rows beside monitored ones


def compiles_here(model: torch.nn.Module, steer, device: torch.device, dtype: torch.dtype, max_rows: int) -> bool:
    """Compile the steering layouts and run one fused layer's two compiled functions on a two-token dummy
    input: False (with a warning) when this machine cannot compile, e.g. Triton finds no C compiler or
    Python headers; the engine then runs the fused layers eagerly instead of failing every request."""
    try:
        warm_steering(steer, int(model.config.get_text_config().hidden_size), device, dtype, max_rows)
        layer = next(x for x in decoder_layers(model) if getattr(x, FUSED_MARK, None) is not None)
        f, attn, mlp = getattr(layer, FUSED_MARK), layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        hidden = torch.randn(1, 2, ln1.weight.shape[0], device=device, dtype=ln1.weight.dtype)
        cos = torch.ones(1, 2, f.head_dim, device=device, dtype=ln1.weight.dtype)
        wb = weight_and_bias  # (module, None) for a 4-bit projection
        f.pre(hidden, ln1.weight, ln1.variance_epsilon, *wb(attn.qkv_proj), cos, cos * 0, f.sizes, f.head_dim)
        if product_module(attn.o_proj) or product_module(mlp.down_proj):
            return True  # they meet the other ranks in an all-reduce: the pieces compile at the first step all run
        out = torch.zeros(1, 2, f.sizes[0], device=device, dtype=hidden.dtype)
        f.post(out, hidden, *wb(attn.o_proj), ln2.weight, ln2.variance_epsilon, *wb(mlp.gate_up_proj),
               *wb(mlp.down_proj))  # fmt: skip
        return True
    except StopIteration:  # no layer could be fused: nothing to compile but the steering function
        return True
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
        log.warning("COMPILE=on: torch.compile failed on this machine (%s: %s); the fused layers run eagerly "
                    "(as COMPILE=merge)", type(exc).__name__, str(exc)[:500])  # fmt: skip
        return False


def warm_up(graphs, max_rows: int) -> float:
    """Compile and capture the decode step for every rows bucket (unsteered layout, shortest key bucket)
    with a progress bar; returns the seconds it took (also logged)."""
    from tqdm import tqdm

    started = time.perf_counter()
    buckets = [b for b in graphs.row_buckets if b <= max_rows]
    for b in tqdm(buckets, desc="compile + capture decode buckets", unit="bucket", leave=False):
        graphs.capture_padding(b)
    seconds = time.perf_counter() - started
    log.info("decode step compiled and captured for %d row buckets %s in %.1f s", len(buckets), buckets, seconds)
    return seconds
