"""The synthetic AWQ / GPTQ checkpoint builder: the packed layouts round-trip, and a built folder has the shapes,
index and quantization_config the loaders read (no kernel library needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from scripts.make_quantized_checkpoint import build
from scripts.quantized_layout import pack_awq, pack_gptq, quantize, unpack_awq, unpack_gptq


@pytest.mark.parametrize("symmetric", [False, True])
def test_layouts_round_trip_to_the_rounded_weight(symmetric):
    w = torch.randn(96, 384, generator=torch.Generator().manual_seed(3)) * 0.02
    codes, zeros, scales = quantize(w, 128, symmetric)
    assert codes.min() >= 0 and codes.max() <= 15 and (not symmetric or bool((zeros == 8).all()))
    expected = (codes.float() - zeros.float().repeat_interleave(128, 1)) * scales.float().repeat_interleave(128, 1)
    if symmetric:
        packed = pack_gptq(codes, zeros, scales, 128)
        assert packed["qweight"].shape == (384 // 8, 96) and packed["g_idx"].tolist() == [i // 128 for i in range(384)]
        assert bool((packed["qzeros"] == 0x77777777).all())  # v1 stores zero - 1 = 7 in every nibble
        got = unpack_gptq(packed)
    else:
        packed = pack_awq(codes, zeros, scales)
        assert packed["qweight"].shape == (384, 96 // 8) and packed["qzeros"].shape == (3, 96 // 8)
        # nibble k of a word holds output column order[k] of its eight: column 1 sits in nibble 4
        assert int((packed["qweight"][0, 0] >> 16) & 0xF) == int(codes[1, 0])
        got = unpack_awq(packed, 128)
    assert torch.equal(got, expected)
    step = scales.float().repeat_interleave(128, 1)
    # round to nearest: within half a step, plus up to half a step more at a group's edge where the rounded
    # zero point shifted the representable range
    assert bool(((got - w).abs() <= step + 1e-6).all())
    assert float((got - w).abs().mean()) < float(step.mean()) / 3


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_built_folder_is_what_the_loaders_read(tmp_path, fmt):
    from transformers import AutoTokenizer

    from app.settings import Settings
    from infrastructure.embedded import ensure_embedded

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded(Settings(_env_file=None).model_cache_dir))
    summary = build(fmt, "tiny-llama", tmp_path, layers=1, tokenizer=tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"]) == (fmt, 4, 128)
    assert q.get("version") == "gemm" if fmt == "awq" else q["checkpoint_format"] == "gptq"
    assert config["num_hidden_layers"] == 1 and summary["shards"] == 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for shard in set(index.values()):
        with safe_open(tmp_path / shard, "pt") as f:
            stored |= {key: (shard, f.get_slice(key).get_shape()) for key in f.keys()}
    assert {k: v[0] for k, v in stored.items()} == index
    down = "model.layers.0.mlp.down_proj"  # in 512, out 256
    if fmt == "awq":
        assert stored[f"{down}.qweight"][1] == [512, 32] and stored[f"{down}.scales"][1] == [4, 256]
    else:
        assert stored[f"{down}.qweight"][1] == [64, 256] and stored[f"{down}.g_idx"][1] == [512]
    assert stored["lm_head.weight"][1] == [49152, 256]  # float16, not quantised
    assert (tmp_path / "tokenizer.json").is_file()
