"""Flash-decoding by hand: a decoding row with a long context is split into key chunks that run as separate
sequences of one FlashAttention-2 varlen call, and the chunks' partial outputs are merged with their
log-sum-exps. Without it one long row is a straggler in every decode step (one thread block per key/value
head streams all its keys while the short rows' blocks are long done); PyTorch's bundled kernel has no
`num_splits` argument before torch 2.13.

The query heads of one key/value head are laid out as that head's query tokens (what the kernel itself does
for one-token queries), so the log-sum-exp comes back as [kv_heads, tokens] in a known order. A row's chunk
boundaries depend on its own length only, and a row with one chunk gets its kernel output unchanged, so a
row's numbers do not depend on the other rows of the step. Shapes depend on (rows, key length bucket) only:
a CUDA graph can hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 512  # keys per chunk
MIN_LONGEST = 2 * CHUNK  # split a decode step only when its longest row has at least this many keys


def worth_splitting(rows: int, longest: int, kv_heads: int, sms: int) -> bool:
    """Split a decode step's keys? Only when its longest row is long and the rows alone fill the GPU: with
    few rows (rows x kv_heads thread blocks under ~0.8 of the multiprocessors) FlashAttention-2 already
    splits one-token queries over the keys itself, and the merge would only add kernels (measured on the
    H200: one 32,000-token row decoded at 89 tokens/s split by hand, 106 without)."""
    return longest >= MIN_LONGEST and rows * kv_heads >= 0.8 * sms


@dataclass
class SplitKeys:
    q_index: torch.Tensor  # [V] the row each chunk's query comes from
    row: torch.Tensor  # [V] the row each chunk's output merges into (rows = padding chunks)
    cu_q: torch.Tensor  # int32 [V+1] query-token offsets (kv groups per chunk)
    cu_k: torch.Tensor  # int32 [V+1] key offsets of the chunks in the packed keys
    rows: int
    chunk: int


def split_layout(lengths: torch.Tensor, length: int, groups: int, chunk: int = CHUNK) -> SplitKeys:
    """Chunks of the packed keys (row i at offset sum(lengths[:i]), lengths[i] keys) for `length` padded keys:
    V = rows + length // chunk chunks, those past the last real one empty and merged into a dummy row."""
    b = lengths.shape[0]
    v = b + length // chunk
    chunks = (lengths + chunk - 1) // chunk
    cum = chunks.cumsum(0)
    t = torch.arange(v, device=lengths.device)
    real = t < cum[-1]
    row = torch.searchsorted(cum, t, right=True).clamp_max(b - 1)
    j = t - (cum - chunks)[row]
    total = lengths.sum()
    start = torch.where(real, (lengths.cumsum(0) - lengths)[row] + j * chunk, total)
    cu_k = torch.cat([start, total.reshape(1)]).to(torch.int32)
    cu_q = (torch.arange(v + 1, device=lengths.device) * groups).to(torch.int32)
    return SplitKeys(row, torch.where(real, row, b), cu_q, cu_k, b, chunk)


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[V,H,d] -> [V*g, KV, d]: query head kv*g+i of chunk v becomes token v*g+i of key/value head kv."""
    v, heads, d = q.shape
    g = heads // kv_heads
    return q.view(v, kv_heads, g, d).permute(0, 2, 1, 3).reshape(v * g, kv_heads, d)


def merge(out: torch.Tensor, lse: torch.Tensor, split: SplitKeys, heads: int) -> torch.Tensor:
    """Kernel output [V*g, KV, d] and log-sum-exp [KV, V*g] of the chunks -> each row's attention [rows, H, d].
    The weighted sums are one-hot matrix products (deterministic, no atomics), in float32."""
    kv_heads, d = out.shape[1], out.shape[2]
    v = split.row.shape[0]
    g = heads // kv_heads
    o = out.view(v, g, kv_heads, d).permute(0, 2, 1, 3).reshape(v, heads, d).float()
    s = lse.reshape(kv_heads, v, g).permute(1, 0, 2).reshape(v, heads).float()
    own = split.row.unsqueeze(0) == torch.arange(split.rows + 1, device=out.device).unsqueeze(1)  # [R+1, V]
    top = torch.where(own.unsqueeze(-1), s.unsqueeze(0), float("-inf")).amax(1)  # [R+1, H]
    w = torch.exp(s - top[split.row])  # [V, H]; padding chunks' NaN stays in the dummy row
    real = own[: split.rows].any(0)  # [V] chunks of real rows
    w = torch.where(real.unsqueeze(-1), w, 0.0)
    o = torch.where(real.view(v, 1, 1), o, 0.0)
    onehot = own[: split.rows].to(torch.float32)
    num = onehot @ (w.unsqueeze(-1) * o).reshape(v, heads * d)
    den = onehot @ w
    return (num.view(split.rows, heads, d) / den.unsqueeze(-1)).to(out.dtype)
