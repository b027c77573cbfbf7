"""Attention over the paged KV pool, plugged into transformers through its AttentionInterface.

A step is one flat (ragged) sequence of tokens [1, T]: each row contributes a span of consecutive
positions (a decoding row one token, a prompt chunk many). Inside every attention layer the function
registered here writes the span's new keys/values into the pool slots of its rows' blocks, then lets
each query attend to its own row's positions only, read through the row's block table:

- `rows`: one SDPA call per row span over its gathered blocks (CPU; a row's numbers do not depend on
  which other rows share the step);
- `grouped`: every decoding row in one SDPA call over the concatenation of their blocks with a
  block-diagonal mask, plus one call per prompt chunk (fp32 on a GPU);
- `flash_paged`: the same kernel reading the pool in place through the rows' block tables (its
  `block_table` argument), so no key/value is copied (CUDA, bf16/fp16; the block size must suit the kernel);
- `flash`: every row in one call of the FlashAttention-2 variable-length kernel that PyTorch ships
  (`aten._flash_attention_forward` with cumulative sequence lengths; causal masks aligned bottom-right,
  so a prompt chunk sees its row's earlier positions): the rows' blocks are gathered into one packed
  key/value tensor, each query block reads only its own row (bf16/fp16 on CUDA).

The model is switched once to the registered name, whose function falls back to the model's own
implementation for any forward that does not carry a step layout (other code sharing the model), and
whose mask function is the original one, so those forwards are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from infrastructure.engine.split_keys import SplitKeys, group_queries, merge
from infrastructure.steering.sites import decoder_layers

PREFIX = "persona_paged:"


@dataclass
class Span:
    """One row's tokens in a step: flat indices [start, start+count), positions from `position`, and
    the pool slots of all its positions 0..position+count-1 (`kv`)."""

    start: int
    count: int
    position: int
    kv: torch.Tensor


@dataclass
class StepLayout:
    pool: KVPool
    slots: torch.Tensor  # [T] pool slot of each token of the step (where its keys/values go)
    spans: list[Span]
    grouped: bool
    decode_q: torch.Tensor | None = None  # flat indices of decoding rows' tokens
    decode_kv: torch.Tensor | None = None  # their blocks' slots, concatenated
    decode_mask: torch.Tensor | None = None  # [n_decode, len(decode_kv)] own row only
    flat_kv: torch.Tensor | None = None  # flash: every row's slots, packed
    split: SplitKeys | None = None  # flash decode steps with a long row: key chunks merged (split_keys.py)
    block_table: torch.Tensor | None = None  # flash_paged: int32 [rows, blocks] read in place (no gather)
    cu_q: torch.Tensor | None = None  # flash: int32 [rows+1] query offsets
    cu_k: torch.Tensor | None = None  # flash: int32 [rows+1] key offsets
    max_q: int = 0
    max_k: int = 0
    _moved: dict = field(default_factory=dict)

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """A layout tensor on a layer's device (moved once per step and device)."""
        key = (name, device)
        if key not in self._moved:
            self._moved[key] = getattr(self, name).to(device, non_blocking=True)
        return self._moved[key]

    def grouped_mask(self, groups: int, device: torch.device) -> torch.Tensor:
        """The decode mask repeated for the query heads of one key/value head: [1,1,groups*n,L]."""
        key = ("grouped_mask", groups, device)
        if key not in self._moved:
            self._moved[key] = self.on("decode_mask", device).repeat(1, 1, groups, 1)
        return self._moved[key]

    def chunk_mask(self, i: int, device: torch.device) -> torch.Tensor:
        """A later prompt chunk's causal mask (query j sees positions <= position + j), built once per step."""
        key = ("chunk_mask", i, device)
        if key not in self._moved:
            span = self.spans[i]
            rows = torch.arange(span.count, device=device).unsqueeze(1) + span.position
            self._moved[key] = torch.arange(span.position + span.count, device=device).unsqueeze(0) <= rows
        return self._moved[key]

    def span_kv(self, i: int, device: torch.device) -> torch.Tensor:
        key = ("span", i, device)
        if key not in self._moved:
            self._moved[key] = self.spans[i].kv.to(device, non_blocking=True)
        return self._moved[key]


class KVPool:
    """Keys and values of every layer: [num_blocks * block_size, kv_heads, head_dim] on the layer's device."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        config = model.config.get_text_config()
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.num_slots, self.block_size = num_blocks * block_size, block_size
        shape = (self.num_slots, self.kv_heads, self.head_dim)
        devices = [next(layer.parameters()).device for layer in decoder_layers(model)]
        alloc = torch.zeros if devices[0].type == "cuda" else torch.empty  # CPU pages stay untouched until used
        self.keys = [alloc(shape, dtype=dtype, device=d) for d in devices]
        self.values = [alloc(shape, dtype=dtype, device=d) for d in devices]

    @staticmethod
    def bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
        config = model.config.get_text_config()
        kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _sdpa(q, k, v, mask, causal: bool, scaling: float | None) -> torch.Tensor:
    """q [1,H,n,d], k/v [L,KV,d] -> [1,H,n,d] (GQA: query heads share their group's key/value head)."""
    k = k.permute(1, 0, 2).unsqueeze(0)
    v = v.permute(1, 0, 2).unsqueeze(0)
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling)


def _sdpa_decode(q, k, v, mask, scaling: float | None) -> torch.Tensor:
    """Decoding rows, one query each: q [1,H,n,d], k/v [L,KV,d], mask [1,1,g*n,L] (the rows' own entries,
    repeated per query head of a group) -> [1,H,n,d]. The g query heads of a key/value head become g*n
    query rows of that head, so keys/values are read once, never copied per query head."""
    _, heads, n, d = q.shape
    kv_heads = k.shape[1]
    g = heads // kv_heads
    qg = q.reshape(1, kv_heads, g * n, d)
    k = k.permute(1, 0, 2).unsqueeze(0)
    v = v.permute(1, 0, 2).unsqueeze(0)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(1, heads, n, d)


def _flash_in_place(step: StepLayout, q, k_pool, v_pool, device, scaling) -> torch.Tensor:
    """FlashAttention-2 varlen reading each row's keys/values through its block table (the pool viewed as
    [blocks, block_size, KV, d]): nothing is copied. Returns [1,T,H,d]."""
    bs = step.pool.block_size
    keys, values = k_pool.view(-1, bs, *k_pool.shape[1:]), v_pool.view(-1, bs, *v_pool.shape[1:])
    return _flash_varlen(step, q, keys, values, device, scaling, block_table=step.on("block_table", device))


def _flash_varlen(step: StepLayout, q, keys, values, device, scaling, **extra) -> torch.Tensor:
    """FA2 varlen, causal (bottom-right), over the step's rows (cumulative query/key lengths): [1,T,H,d]."""
    out = torch.ops.aten._flash_attention_forward(
        q[0].transpose(0, 1).contiguous(),
        keys,
        values,
        step.on("cu_q", device),
        step.on("cu_k", device),
        step.max_q,
        step.max_k,
        0.0,
        True,
        False,
        scale=scaling,
        **extra,
    )[0]
    return out.unsqueeze(0)


def _flash_split(step: StepLayout, q, k_pool, v_pool, device, scaling) -> torch.Tensor:
    """A decode step (one query per row) over the packed keys, long rows split into key chunks: [1,T,H,d]."""
    sp = step.split
    kv = step.on("flat_kv", device)
    heads, kv_heads = q.shape[1], k_pool.shape[1]
    queries = group_queries(q[0].transpose(0, 1)[sp.q_index], kv_heads)
    g = heads // kv_heads
    out, lse = torch.ops.aten._flash_attention_forward(
        queries, k_pool[kv], v_pool[kv], sp.cu_q, sp.cu_k, g, sp.chunk, 0.0, False, False, scale=scaling
    )[:2]
    return merge(out, lse, sp, heads).unsqueeze(0)


def paged_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one layer for a step: query [1,H,T,d], key/value [1,KV,T,d] of the step's tokens.
    Returns [1,T,H,d] like transformers' own attention functions."""
    step: StepLayout = kwargs["persona_step"]
    layer = module.layer_idx
    k_pool, v_pool = step.pool.keys[layer], step.pool.values[layer]
    device = k_pool.device
    slots = step.on("slots", device)
    k_pool.index_copy_(0, slots, key[0].transpose(0, 1).to(k_pool.dtype))
    v_pool.index_copy_(0, slots, value[0].transpose(0, 1).to(v_pool.dtype))
    q = query.to(k_pool.dtype)
    if step.block_table is not None:
        return _flash_in_place(step, q, k_pool, v_pool, device, scaling), None
    if step.split is not None:
        return _flash_split(step, q, k_pool, v_pool, device, scaling), None
    if step.flat_kv is not None:
        kv = step.on("flat_kv", device)
        return _flash_varlen(step, q, k_pool[kv], v_pool[kv], device, scaling), None
    out = torch.empty_like(q.transpose(1, 2))  # [1,T,H,d]
    for i, span in enumerate(step.spans):
        if step.grouped and span.count == 1:
            continue
        kv = step.span_kv(i, device)
        qs = q[:, :, span.start : span.start + span.count]
        causal = span.count > 1 and span.position == 0
        mask = step.chunk_mask(i, device) if span.count > 1 and span.position > 0 else None
        res = _sdpa(qs, k_pool[kv], v_pool[kv], mask, causal, scaling)
        out[:, span.start : span.start + span.count] = res.transpose(1, 2)
    if step.grouped and step.decode_q is not None:
        index, kv = step.on("decode_q", device), step.on("decode_kv", device)
        qd = q[:, :, index]
        mask = step.grouped_mask(q.shape[1] // k_pool.shape[1], device)
        res = _sdpa_decode(qd, k_pool[kv], v_pool[kv], mask, scaling)
        out[:, index] = res.transpose(1, 2)
    return out, None


def enable_paged_attention(model: torch.nn.Module) -> None:
    """Switch the model to the paged attention name (idempotent): paged when a step layout is passed,
    the model's original attention otherwise."""
    config = model.config
    current = config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return
    name = PREFIX + current
    original = ALL_ATTENTION_FUNCTIONS.get_interface(current, None)
    if original is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        original = eager_attention_forward

    def dispatch(module, query, key, value, attention_mask, **kwargs):
        if kwargs.get("persona_step") is None:
            kwargs.pop("persona_step", None)
            return original(module, query, key, value, attention_mask, **kwargs)
        return paged_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, dispatch)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(current)
    if mask_fn is not None:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)
    config._attn_implementation = name
