"""The on-disk 4-bit layouts of AWQ (AutoAWQ "gemm") and GPTQ (AutoGPTQ / GPTQModel "gptq" v1) checkpoints.

Both store, per Linear of `in` inputs and `out` outputs and groups of `g` inputs (`in / g` groups):

* AWQ GEMM: `qweight` int32 [in, out/8] (eight 4-bit codes per word along the outputs, in the interleaved
  order 0 2 4 6 1 3 5 7), `qzeros` int32 [in/g, out/8] (same packing), `scales` float16 [in/g, out];
  weight[o, i] = (code - zero) * scale, asymmetric (a zero point per group and output).
* GPTQ: `qweight` int32 [in/8, out] (eight codes per word along the inputs, natural order), `qzeros` int32
  [in/g, out/8] holding zero - 1 (the v1 format's historical offset), `scales` float16 [in/g, out],
  `g_idx` int32 [in] (the group of each input; `i // g` without act-order); symmetric: every zero is 8.

`quantize`/`pack_*` turn float weights into those tensors (the checkpoint builder) and `unpack_*` turn them
back into the dequantised float weight (the tests' plain reference model), all vectorised on any device.
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS  # codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the position of the code stored at nibble k of an AWQ word


def quantize(weight: torch.Tensor, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit codes of a [out, in] weight per group of `group` inputs:
    (codes [out, in] int32, zeros [out, in/group] int32, scales [out, in/group] float16)."""
    out_f, in_f = weight.shape
    w = weight.float().reshape(out_f, in_f // group, group)
    if symmetric:
        scales = (w.abs().amax(-1) * 2 / 15).clamp(min=1e-6)
        zeros = torch.full_like(scales, 8)
    else:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = ((high - low) / 15).clamp(min=1e-6)
        zeros = (-low / scales).round().clamp(0, 15)
    scales = scales.half().float()  # the stored precision, so codes round against the scale the loader sees
    codes = (w / scales[..., None] + zeros[..., None]).round().clamp(0, 15)
    return codes.reshape(out_f, in_f).int(), zeros.int(), scales.half()


def _pack_last(codes: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Eight 4-bit codes per int32 along the last dimension; nibble k holds code order[k] of each eight."""
    grouped = codes.int().reshape(*codes.shape[:-1], codes.shape[-1] // PACK, PACK)
    if order is not None:
        grouped = grouped[..., list(order)]
    words = torch.zeros(grouped.shape[:-1], dtype=torch.int32, device=codes.device)
    for k in range(PACK):
        words |= grouped[..., k] << (BITS * k)
    return words


def _unpack_last(words: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    shifts = torch.arange(0, 32, BITS, device=words.device, dtype=torch.int32)
    nibbles = (words[..., None] >> shifts) & 0xF  # [..., n, 8]: nibble k
    if order is not None:
        inverse = [order.index(j) for j in range(PACK)]  # code j sits at nibble order.index(j)
        nibbles = nibbles[..., inverse]
    return nibbles.reshape(*words.shape[:-1], words.shape[-1] * PACK)


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors from `quantize(..., symmetric=False)`'s output."""
    return {
        "qweight": _pack_last(codes.t().contiguous(), AWQ_ORDER),
        "qzeros": _pack_last(zeros.t().contiguous(), AWQ_ORDER),
        "scales": scales.t().contiguous(),
    }


def unpack_awq(tensors: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """The dequantised [out, in] float32 weight of an AWQ GEMM Linear."""
    codes = _unpack_last(tensors["qweight"], AWQ_ORDER).float()  # [in, out]
    zeros = _unpack_last(tensors["qzeros"], AWQ_ORDER).float().repeat_interleave(group, 0)
    scales = tensors["scales"].float().repeat_interleave(group, 0)
    return ((codes - zeros) * scales).t().contiguous()


def pack_awq_gemv(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ "gemv" tensors: `qweight` [out, in/8] packed along the inputs in natural order, `qzeros` [out, w]
    and `scales` [out, 8w] with the groups padded to a width of whole words (`w`: AutoAWQ's
    calculate_zeros_width for group >= 128)."""
    out_f, groups = zeros.shape
    width = -(-groups // PACK)
    padded_zeros = torch.zeros(out_f, width * PACK, dtype=torch.int32, device=zeros.device)
    padded_zeros[:, :groups] = zeros
    padded_scales = torch.zeros(out_f, width * PACK, dtype=torch.float16, device=scales.device)
    padded_scales[:, :groups] = scales
    return {"qweight": _pack_last(codes), "qzeros": _pack_last(padded_zeros), "scales": padded_scales}


def unpack_awq_gemv(tensors: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """The dequantised [out, in] float32 weight of an AWQ GEMV Linear (padding groups dropped)."""
    codes = _unpack_last(tensors["qweight"]).float()  # [out, in]
    groups = codes.shape[1] // group
    zeros = _unpack_last(tensors["qzeros"])[:, :groups].float().repeat_interleave(group, 1)
    scales = tensors["scales"][:, :groups].float().repeat_interleave(group, 1)
    return (codes - zeros) * scales


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """GPTQ (v1 checkpoint format) tensors from `quantize(..., symmetric=True)`'s output."""
    in_f = codes.shape[1]
    return {
        "qweight": _pack_last(codes.contiguous()).t().contiguous(),  # packed along the inputs
        "qzeros": _pack_last((zeros - 1).t().contiguous()),
        "scales": scales.t().contiguous(),
        "g_idx": torch.arange(in_f, dtype=torch.int32, device=codes.device) // group,
    }


def unpack_gptq(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dequantised [out, in] float32 weight of a GPTQ (v1) Linear; groups come from g_idx."""
    codes = _unpack_last(tensors["qweight"].t().contiguous()).float()  # [out, in]
    g_idx = tensors["g_idx"].long()
    zeros = (_unpack_last(tensors["qzeros"]).float() + 1)[g_idx]  # [in, out]
    scales = tensors["scales"].float()[g_idx]
    return (codes - zeros.t()) * scales.t()


def dequantised_state_dict(folder) -> dict[str, torch.Tensor]:
    """A checkpoint folder's tensors with every 4-bit Linear turned back into a plain float32 `weight`: the
    state dict of the same model unquantised (the tests' reference)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(shard)
    linears = {key.rsplit(".", 1)[0] for key in tensors if key.endswith(".qweight")}
    out = {key: value.float() for key, value in tensors.items() if key.rsplit(".", 1)[0] not in linears}
    out |= {key: value.float() for key, value in tensors.items() if key.endswith(".bias")}
    for name in linears:
        parts = {
            part: tensors[f"{name}.{part}"]
            for part in ("qweight", "qzeros", "scales", "g_idx")
            if f"{name}.{part}" in tensors
        }
        if q["quant_method"] == "awq" and str(q.get("version", "gemm")).lower() == "gemv":
            out[f"{name}.weight"] = unpack_awq_gemv(parts, q["group_size"])
        elif q["quant_method"] == "awq":
            out[f"{name}.weight"] = unpack_awq(parts, q["group_size"])
        else:
            out[f"{name}.weight"] = unpack_gptq(parts)
    return out
