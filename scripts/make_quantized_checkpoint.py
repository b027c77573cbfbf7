"""Synthetic pre-quantised checkpoints: random weights in the real AWQ / GPTQ on-disk layout.

    python -m scripts.make_quantized_checkpoint --format awq --arch tiny-llama --out /tmp/tiny-awq
    python -m scripts.make_quantized_checkpoint --format gptq --arch qwen2.5-7b --device cuda --out /data/q7b-gptq
    python -m scripts.make_quantized_checkpoint --format awq --arch llama-3.3-70b --device cuda --out /data/l70b-awq
    python -m scripts.make_quantized_checkpoint --format awq-gemv --arch tiny-llama --out /tmp/tiny-awq-gemv

The folder holds what AutoAWQ / GPTQModel write: config.json with the real architecture and the
`quantization_config` those tools write (4 bits, group 128; AWQ "gemm" (or "gemv": awq-gemv) with zero points, GPTQ
symmetric without act-order, v1 checkpoint format), one safetensors shard per decoder layer plus
one for the embeddings, final norm and lm_head (float16, not quantised, as both tools leave them),
model.safetensors.index.json, and the embedded SmolLM2 tokenizer (every arch's vocabulary is larger;
the lm_head rows of ids it cannot decode are zeroed so greedy decoding streams text, as in
scripts/bench_archs). Weights are N(0, 0.02) drawn per layer on --device (seeded), quantised by
round-to-nearest and packed there (scripts/quantized_layout), and written layer by layer from a
writer thread, so a 70B checkpoint (~40 GB) never sits in memory at once.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scripts.bench_archs import arch_config
from scripts.quantized_layout import pack_awq, pack_awq_gemv, pack_gptq, quantize

GROUP = 128
STD = 0.02
# a 2-layer Llama whose every Linear has whole groups of 128 inputs; loads and runs in seconds on a CPU
TINY_LLAMA = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
TINY_LLAMA |= dict(vocab_size=49152, max_position_embeddings=8192, num_hidden_layers=2)
ARCH_NAMES = ("tiny-llama", "qwen2.5-7b", "llama-3.3-70b")


def build_config(arch: str, layers: int | None):
    """The transformers config of the arch (tiny-llama: the 70B Llama shape shrunk), float16."""
    config = arch_config("llama-3.3-70b", layers, TINY_LLAMA) if arch == "tiny-llama" else arch_config(arch, layers)
    config.dtype = torch.float16
    return config


def quantization_config(fmt: str) -> dict[str, Any]:
    """The `quantization_config` entry of config.json as AutoAWQ (gemm) and GPTQModel (gptq v1) write it."""
    if fmt in ("awq", "awq-gemv"):
        version = "gemv" if fmt == "awq-gemv" else "gemm"
        return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": version} | {
            "modules_to_not_convert": None
        }
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "static_groups": False,
        "checkpoint_format": "gptq",
    }


def linear_shapes(config) -> dict[str, tuple[int, int, bool]]:
    """(out, in, has bias) of each quantised Linear of one decoder layer, keyed by its name in the layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    bias = config.model_type == "qwen2"  # Qwen2 has q/k/v biases; Llama has none
    return {
        "self_attn.q_proj": (q_out, hidden, bias),
        "self_attn.k_proj": (kv_out, hidden, bias),
        "self_attn.v_proj": (kv_out, hidden, bias),
        "self_attn.o_proj": (hidden, q_out, False),
        "mlp.gate_proj": (inter, hidden, False),
        "mlp.up_proj": (inter, hidden, False),
        "mlp.down_proj": (hidden, inter, False),
    }


def _normal(shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * STD


@torch.no_grad()
def layer_tensors(config, fmt: str, layer: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """One decoder layer's checkpoint tensors (on the CPU), generated and packed on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + layer)
    prefix, out = f"model.layers.{layer}.", {}
    for name, (out_f, in_f, bias) in linear_shapes(config).items():
        codes, zeros, scales = quantize(_normal((out_f, in_f), gen, device), GROUP, symmetric=fmt == "gptq")
        if fmt == "gptq":
            packed = pack_gptq(codes, zeros, scales, GROUP)
        else:
            packed = (pack_awq_gemv if fmt == "awq-gemv" else pack_awq)(codes, zeros, scales)
        if bias:
            packed["bias"] = _normal((out_f,), gen, device).half()
        out |= {f"{prefix}{name}.{key}": value for key, value in packed.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{prefix}{norm}.weight"] = torch.ones(config.hidden_size, dtype=torch.float16, device=device)
    return {key: value.to("cpu", non_blocking=False).contiguous() for key, value in out.items()}


@torch.no_grad()
def outer_tensors(config, tokenizer: Any, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and lm_head (float16, never quantised); undecodable lm_head rows zeroed."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 999_999)
    vocab, hidden = config.vocab_size, config.hidden_size
    head = _normal((vocab, hidden), gen, device).half()
    head[len(tokenizer) :] = 0
    head[list(tokenizer.all_special_ids)] = 0
    out = {
        "model.embed_tokens.weight": _normal((vocab, hidden), gen, device).half(),
        "model.norm.weight": torch.ones(hidden, dtype=torch.float16, device=device),
        "lm_head.weight": head,
    }
    return {key: value.cpu().contiguous() for key, value in out.items()}


def _tokenizer(source: str | None):
    from transformers import AutoTokenizer

    if source is None:
        from app.settings import Settings
        from infrastructure.embedded import ensure_embedded

        source = str(ensure_embedded(Settings().model_cache_dir))
    return AutoTokenizer.from_pretrained(source)


def build(
    fmt: str, arch: str, out: Path, layers: int | None = None, device: str = "cpu", seed: int = 0, tokenizer=None
) -> dict[str, Any]:
    """Write the checkpoint into `out`; returns its size, shard count and seconds."""
    started = time.perf_counter()
    config = build_config(arch, layers)
    config.quantization_config = quantization_config(fmt)
    tokenizer = tokenizer if tokenizer is not None else _tokenizer(None)
    out.mkdir(parents=True, exist_ok=True)
    n_layers = config.num_hidden_layers
    n_shards = n_layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    pending: list[Future] = []

    def write(tensors: dict[str, torch.Tensor], index: int) -> None:
        save_file(tensors, str(out / f"model-{index:05d}-of-{n_shards:05d}.safetensors"), metadata={"format": "pt"})

    with ThreadPoolExecutor(max_workers=2) as writer:  # generation on the device overlaps the disk writes
        for index in range(n_shards):
            if index == 0:
                tensors = outer_tensors(config, tokenizer, device, seed)
            else:
                tensors = layer_tensors(config, fmt, index - 1, device, seed)
            shard = f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"
            weight_map |= dict.fromkeys(tensors, shard)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            pending.append(writer.submit(write, tensors, index + 1))
            while sum(not f.done() for f in pending) > 3:  # at most a few layers in host memory
                time.sleep(0.01)
            del tensors
        for future in pending:
            future.result()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"format": fmt, "arch": arch, "layers": n_layers, "bytes": total, "shards": n_shards} | {
        "seconds": time.perf_counter() - started
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", choices=("awq", "awq-gemv", "gptq"), required=True)
    p.add_argument("--arch", choices=ARCH_NAMES, required=True)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the arch's own)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu", help="where weights are drawn and packed (cuda: much faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded SmolLM2's)")
    args = p.parse_args(argv)
    summary = build(args.format, args.arch, args.out, args.layers, args.device, args.seed, _tokenizer(args.tokenizer))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
