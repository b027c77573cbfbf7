"""Tensor-parallel sharding of a Llama/Qwen2-style decoder: each rank keeps a slice of every layer.

Per layer, the query/key/value and gate/up projections are split by output rows (column parallel: a rank
computes its own heads and its own part of the MLP's inner width), the output and down projections by input
columns (row parallel: a rank's partial sums are all-reduced, so the residual stream after every layer is
the same full tensor on every rank). Embeddings and norms are replicated; the LM head lives on rank 0 alone,
which samples (the other ranks compute no logits).

Heads are split by key/value group, so every rank holds whole groups (its query heads are exactly those of
its key/value heads, and the paged attention's GQA layout is the model's own): with 3 key/value heads over 2
ranks, rank 0 holds groups 0-1 and rank 1 group 2 (uneven, as the MLP may be). With fewer key/value heads
than ranks, each key/value head is replicated on world/kv ranks that split its query heads. The split is a
model transformation after loading (or on a meta-device model, with `weight` giving each full tensor), so
later rewrites of the local projections (fusing q/k/v, compiling) apply to the shards unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from infrastructure.errors import ModelLoadError
from infrastructure.steering.sites import decoder_layers

Weight = Callable[[str, torch.Tensor], torch.Tensor]  # (parameter name, parameter) -> the full tensor


def chunks(n: int, world: int) -> list[tuple[int, int]]:
    """(start, count) of `n` items over `world` ranks, as even as possible, the first ranks taking the extra."""
    base, extra = divmod(n, world)
    out, start = [], 0
    for rank in range(world):
        count = base + (rank < extra)
        out.append((start, count))
        start += count
    return out


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world: int
    head_dim: int
    q_heads: tuple[int, int]  # (first query head, count)
    kv_heads: tuple[int, int]  # (first key/value head, count)
    mlp: tuple[int, int]  # (first inner unit of the MLP, count)


def shard_plan(config, rank: int, world: int) -> ShardPlan:
    """Which heads and MLP units rank `rank` of `world` holds (ModelLoadError when the model cannot split so)."""
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    group = heads // kv
    if kv >= world:
        start, count = chunks(kv, world)[rank]
        q, k = (start * group, count * group), (start, count)
    else:
        share = world // kv  # ranks sharing one key/value head
        if world % kv or group % share:
            raise ModelLoadError(
                f"TENSOR_PARALLEL_SIZE={world} does not divide the model's {kv} key/value heads "
                f"({heads} query heads) into whole groups: use a size dividing {kv}, or LAYER_SPLIT_SIZE"
            )
        head, part = divmod(rank, share)
        q, k = (head * group + part * (group // share), group // share), (head, 1)
    if int(text.intermediate_size) < world:
        raise ModelLoadError(f"TENSOR_PARALLEL_SIZE={world} exceeds the MLP width {text.intermediate_size}")
    return ShardPlan(rank, world, head_dim, q, k, chunks(int(text.intermediate_size), world)[rank])


class RowParallelLinear(nn.Module):
    """A linear layer holding a slice of the input columns: local matmul, sum over the ranks, then the bias.
    `graph_group`, when set, is the communicator of all-reduces captured into CUDA graphs (eager steps keep
    `group`), for NCCL builds that cannot mix captured and eager collectives on one communicator. `reducer`,
    when set, sums the tensors it fits (decode steps, eager or captured) through symmetric memory
    (`tp_comm.py`), alternating its two buffers by `half` (o_proj 0, down_proj 1: consecutive calls differ)."""

    fused_as_module = True  # a fused layer calls it between its compiled pieces (fusion.product_module)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, half: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.group, self.graph_group, self.reducer, self.half = group, None, None, half
        self.fp32_partials = False  # set by use_fp32_partials

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of x @ W.T; with `fp32_partials`, accumulated and returned in float32."""
        if not self.fp32_partials:
            return F.linear(x, self.weight)
        flat = torch.mm(x.reshape(-1, self.in_features), self.weight.t(), out_dtype=torch.float32)
        return flat.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.partial(x)
        if self.reducer is not None and self.reducer.fits(out):
            out = self.reducer(out, self.half)
        else:
            captured = self.graph_group is not None and x.is_cuda and torch.cuda.is_current_stream_capturing()
            dist.all_reduce(out, group=self.graph_group if captured else self.group)
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias


def use_graph_group(model: nn.Module, group) -> None:
    """Route the all-reduces captured into CUDA graphs through `group` (see RowParallelLinear)."""
    for module in model.modules():
        if isinstance(module, RowParallelLinear):
            module.graph_group = group


def use_fp32_partials(model: nn.Module) -> bool:
    """On a half-precision CUDA model, let the row-parallel layers sum float32 partial results, rounded to the
    model's dtype once after the all-reduce, like one GPU's matmul rounds its float32 accumulator once (summing
    rounded bf16 partials rounds twice more and moves greedy choices at near ties). Needs torch.mm's
    `out_dtype` (probed here: every rank gets the same answer). Returns whether it is on."""
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    weight = rows[0].weight if rows else None
    if weight is None or not weight.is_cuda or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        probe = torch.ones(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
        torch.mm(probe, weight.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    for module in rows:
        module.fp32_partials = True
    return True


def use_reducer(model: nn.Module, reducer) -> None:
    """Sum decode-sized partial results through `reducer` (None: NCCL for all; see RowParallelLinear)."""
    for module in model.modules():
        if isinstance(module, RowParallelLinear):
            module.reducer = reducer


class NoLogits(nn.Module):
    """The LM head of a rank that does not sample: logits with no vocabulary columns (nothing computed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], 0)


def _column(linear: nn.Linear, name: str, start: int, count: int, weight: Weight) -> None:
    """Keep output rows [start, start+count) of a linear layer (and of its bias)."""
    linear.weight = nn.Parameter(weight(f"{name}.weight", linear.weight).narrow(0, start, count).clone(), False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(weight(f"{name}.bias", linear.bias).narrow(0, start, count).clone(), False)
    linear.out_features = count


def _row(linear: nn.Linear, name: str, start: int, count: int, weight: Weight, group, half: int) -> RowParallelLinear:
    full = weight(f"{name}.weight", linear.weight)
    bias = None if linear.bias is None else weight(f"{name}.bias", linear.bias).clone()
    return RowParallelLinear(full.narrow(1, start, count).clone(), bias, group, half)


def shard_model(model: nn.Module, plan: ShardPlan, group=None, weight: Weight | None = None) -> None:
    """Cut every decoder layer of `model` down to this rank's shard, in place, and make the config say so
    (its head counts become the local ones: the KV pool and the attention kernels read them)."""
    weight = weight or (lambda _name, p: p)
    names = {id(m): n for n, m in model.named_modules()}
    hd, (q0, nq), (k0, nk), (m0, nm) = plan.head_dim, plan.q_heads, plan.kv_heads, plan.mlp
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
        if any(
            part is None or not all(isinstance(getattr(part, a, None), nn.Linear) for a in attrs)
            for part, attrs in needed
        ):
            raise ModelLoadError(f"tensor parallelism needs Llama/Qwen2-style layers, not {type(layer).__name__}")

        def name(module: nn.Module) -> str:
            return names[id(module)]

        _column(attn.q_proj, name(attn.q_proj), q0 * hd, nq * hd, weight)
        _column(attn.k_proj, name(attn.k_proj), k0 * hd, nk * hd, weight)
        _column(attn.v_proj, name(attn.v_proj), k0 * hd, nk * hd, weight)
        attn.o_proj = _row(attn.o_proj, name(attn.o_proj), q0 * hd, nq * hd, weight, group, 0)
        _column(mlp.gate_proj, name(mlp.gate_proj), m0, nm, weight)
        _column(mlp.up_proj, name(mlp.up_proj), m0, nm, weight)
        mlp.down_proj = _row(mlp.down_proj, name(mlp.down_proj), m0, nm, weight, group, 1)
        attn.num_key_value_groups = nq // nk
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = nm
    text = model.config.get_text_config()
    text.head_dim = hd
    text.num_attention_heads, text.num_key_value_heads, text.intermediate_size = nq, nk, nm
    if plan.rank != 0:
        model.set_output_embeddings(NoLogits())
