"""Model shapes for the serving benchmark: public architectures rebuilt from their configs with random weights.

No checkpoint is needed: the numbers below are the published config values of each model, so a
random-weight model has exactly the real one's weight bytes, layer count and attention layout,
which is all that decode speed depends on. Prompts use the embedded SmolLM2 tokenizer (vocab
49152, smaller than every arch here); the lm_head rows of ids that tokenizer cannot decode are
zeroed so greedy decoding stays among decodable, non-special tokens and every step streams text.
"""

from __future__ import annotations

import time
from typing import Any

import torch

ARCHS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": dict(
        family="qwen2",
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    ),
    "qwen2.5-1.5b": dict(
        family="qwen2",
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
    "qwen2.5-3b": dict(
        family="qwen2",
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
    "llama-3.3-70b": dict(
        family="llama",
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        rope_theta=5e5,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
}


def arch_config(name: str, layers: int | None = None, overrides: dict | None = None):
    """The transformers config of a named arch, optionally truncated to `layers` decoder layers (and with
    `overrides` applied: a shrunken copy for CPU flow checks)."""
    from transformers import LlamaConfig, Qwen2Config

    values = dict(ARCHS[name]) | (overrides or {})
    family = values.pop("family")
    if layers is not None:
        values["num_hidden_layers"] = min(layers, values["num_hidden_layers"])
    cls = Qwen2Config if family == "qwen2" else LlamaConfig
    return cls(**values, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def projection_widths(config) -> tuple[int, int]:
    """(query width, key/value width) of an attention layer: heads x head_dim (head_dim from the config when set)."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head, config.num_key_value_heads * head


def build_random_model(
    name: str,
    layers: int | None,
    device: str,
    tokenizer: Any,
    dtype: torch.dtype | None = None,
    overrides: dict | None = None,
) -> tuple[torch.nn.Module, float]:
    """Random-weight model of the arch on `device` (default bf16 on CUDA, fp32 on CPU) and its build seconds."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    config = arch_config(name, layers, overrides)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    _confine_to_tokenizer(model, tokenizer)
    return model, time.perf_counter() - started


@torch.no_grad()
def _confine_to_tokenizer(model: torch.nn.Module, tokenizer: Any) -> None:
    """Zero the output rows of ids the tokenizer cannot decode (and of its special ids)."""
    head = model.get_output_embeddings().weight
    head[len(tokenizer) :] = 0
    for special in tokenizer.all_special_ids:
        head[special] = 0


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters (tied embeddings counted once): what a batch-1 decode step reads."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth(device: str, gib: float = 2.0, repeats: int = 10) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), or None off the GPU."""
    if device != "cuda":
        return None
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds
