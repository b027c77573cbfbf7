"""Where Marlin keeps each 4-bit code, scale and zero point, read off the library's own repacking (issue 15).

gptqmodel's Marlin module repacks AutoAWQ "gemm" tensors at `post_init` into its kernel's layout: the codes of
every tile of 16 inputs x 64 outputs (128 int32 words) permuted the same way, the scales and zero points of every
chunk of 64 outputs permuted the same way. Rather than restating those permutations here, `probe` packs small
modules whose codes, scales and zero points are their own source positions (one base-16 digit per probe for the
4-bit ones), reads where each one landed, checks that the result is one permutation repeated over every tile and
chunk (else it returns None: the layout is not what the dequantiser assumes), and keeps the inverse tables a
dequantiser reads: for an output (k, n), the nibble of its tile holding code (k, n), and the column (scales) or
nibble (zero points) of its chunk holding group k // group's value for n.

`dequantise` is the reference in torch (CPU tests; small modules); `marlin_triton.dequantise` is the same
arithmetic in one Triton kernel for prefill-sized products (`quant_marlin.MarlinLinear`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from infrastructure.quant_gemlite import BITS, PACK, nibbles

log = logging.getLogger(__name__)

TILE_K, TILE_N = 16, 64  # a code tile: 16 inputs x 64 outputs, TILE_WORDS int32 words
TILE_WORDS = TILE_K * TILE_N // PACK
CHUNK = 64  # scales and zero points are permuted within chunks of 64 outputs

# repack(codes [out, in] uint8, zeros [out, G] float16, scales [out, G] float16, group)
#   -> (qweight [in/16, out*2] int32, scales [G, out] float16, qzeros [G, out/8] int32) in the kernel's layout
Repack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MarlinLayout:
    codes: torch.Tensor  # int32 [1024]: nibble of the tile (word * 8 + shift / 4) holding code (k % 16) * 64 + n % 64
    scales: torch.Tensor  # int32 [64]: column of the chunk holding the scale of output n % 64
    zeros: torch.Tensor  # int32 [64]: nibble of the chunk holding the zero point of output n % 64

    def to(self, device: torch.device) -> MarlinLayout:
        return MarlinLayout(self.codes.to(device), self.scales.to(device), self.zeros.to(device))


def _digits(values: torch.Tensor, digit: int) -> torch.Tensor:
    return ((values >> (BITS * digit)) & 0xF).to(torch.uint8)


def _chunked(src: torch.Tensor, width: int, size: int) -> torch.Tensor | None:
    """src [rows, width]: the source column (within its chunk of `size`) each position holds, when every chunk
    holds its own columns under one permutation; else None."""
    pos = torch.arange(width, device=src.device)
    if not torch.equal(src // size, (pos // size).expand_as(src)):
        return None
    local = (src % size).reshape(src.shape[0], -1, size)
    if not torch.equal(local, local[:1, :1].expand_as(local)):
        return None
    first = local[0, 0]
    if not torch.equal(first.sort().values, torch.arange(size, device=src.device)):
        return None
    return first


def probe(repack: Repack, device: torch.device, in_features: int = 256, out_features: int = 128, group: int = 128):
    """The MarlinLayout of `repack` (None, logged, when its result is not one permutation per tile and chunk)."""
    k_size, n_size, groups = in_features, out_features, in_features // group
    ks = torch.arange(k_size, device=device)
    ns = torch.arange(n_size, device=device)
    code_src = (ks[None, :] * n_size + ns[:, None]).to(torch.int64)  # [out, in]: the source index k * N + n
    zero_src = (torch.arange(groups, device=device)[None, :] * n_size + ns[:, None]).to(torch.int64)  # [out, G]
    scales = (zero_src + 1).to(torch.float16)  # exact integers up to 2048
    codes_at = zeros_at = scales_at = None
    for digit in range(-(-int(code_src.max()).bit_length() // BITS)):
        qweight, s, qzeros = repack(_digits(code_src, digit), _digits(zero_src, digit).to(torch.float16), scales, group)
        got = nibbles(qweight).to(torch.int64) << (BITS * digit)
        codes_at = got if codes_at is None else codes_at | got
        got = nibbles(qzeros).to(torch.int64) << (BITS * digit)
        zeros_at = got if zeros_at is None else zeros_at | got
        scales_at = s.to(torch.int64) - 1
    rows = torch.arange(k_size // TILE_K, device=device)[:, None]
    g_rows = torch.arange(groups, device=device)[:, None]
    if (
        codes_at.shape != (k_size // TILE_K, n_size * TILE_K)
        or not torch.equal(codes_at // n_size // TILE_K, rows.expand_as(codes_at))
        or not torch.equal(scales_at // n_size, g_rows.expand_as(scales_at))
        or not torch.equal(zeros_at // n_size, g_rows.expand_as(zeros_at))
    ):
        log.warning("Marlin's repacking moved codes across tiles or groups: prefill stays on Marlin")
        return None
    k_local, n = (codes_at // n_size) % TILE_K, codes_at % n_size
    # per position of a tile row: its tile (n // 64) and the code it holds, as one "source column" of width 1024
    src = (n // TILE_N) * (TILE_K * TILE_N) + k_local * TILE_N + n % TILE_N
    codes = _chunked(src, src.shape[1], TILE_K * TILE_N)
    scale_cols = _chunked(scales_at % n_size, n_size, CHUNK)
    zero_cols = _chunked(zeros_at % n_size, n_size, CHUNK)
    if codes is None or scale_cols is None or zero_cols is None:
        log.warning("Marlin's repacking is not one permutation per tile and chunk: prefill stays on Marlin")
        return None
    # inverse: for each source (code / output within the chunk), the position holding it
    return MarlinLayout(*(t.argsort().to(torch.int32) for t in (codes, scale_cols, zero_cols)))


def dequantise(layout: MarlinLayout, qweight, scales, qzeros, group: int, dtype=torch.float16) -> torch.Tensor:
    """The [in, out] weight of Marlin tensors (torch reference: index tensors of the weight's size)."""
    k_size, n_size = qweight.shape[0] * TILE_K, scales.shape[1]
    device = qweight.device
    layout = layout.to(device)
    k = torch.arange(k_size, device=device)[:, None]
    n = torch.arange(n_size, device=device)[None, :]
    pos = layout.codes[(k % TILE_K) * TILE_N + n % TILE_N].long()
    words = qweight[k // TILE_K, (n // TILE_N) * TILE_WORDS + pos // PACK]
    q = (words >> (BITS * (pos % PACK))) & 0xF
    g = k // group
    s = scales[g, (n // CHUNK) * CHUNK + layout.scales[n % CHUNK].long()]
    zpos = (n // CHUNK) * CHUNK + layout.zeros[n % CHUNK].long()
    z = (qzeros[g, zpos // PACK] >> (BITS * (zpos % PACK))) & 0xF
    return ((q - z).to(torch.float32) * s.float()).to(dtype)
