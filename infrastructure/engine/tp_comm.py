"""How the sharded layers sum their partial results on GPUs: which all-reduce a step uses.

TENSOR_PARALLEL_GRAPH_REDUCE picks how decode steps (at most max_rows tokens) all-reduce, and so whether
they can be CUDA graphs under tensor parallelism:

- `symm_mem`: PyTorch's symmetric memory (`torch.distributed._symmetric_memory`). Every rank owns a buffer
  that the others map over NVLink/P2P; `one_shot_all_reduce_copy` copies the rank's partial sums into it,
  meets the peers at a barrier of signal pads and sums every rank's buffer: one plain kernel on the current
  stream, so a CUDA graph captures it like any other kernel (no NCCL side stream, no watchdog event, no
  proxy thread) and it costs microseconds for decode-sized tensors. Two buffers alternate between
  consecutive all-reduces, so a rank writing the next partial sums never overwrites what a slower peer is
  still reading (the kernel's barrier sits after its copy).
- `nccl`: ProcessGroupNCCL's all-reduce captured into the graph as is (it hung on 2 x H200 in issue 16's
  first runs; kept to diagnose and for builds where it works).
- `off`: decode steps run eagerly under tensor parallelism (every all-reduce through NCCL).
- `auto`: `symm_mem` where it sets up (a failure is logged), else `off`.

Tensors larger than the buffer (prompt chunks) always go through NCCL, eagerly.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

GRAPH_REDUCE_MODES = ("auto", "symm_mem", "nccl", "off")


class SymmetricAllReduce:
    """Sum of a [tokens, hidden] tensor over the group through symmetric memory (CUDA only; see the module)."""

    def __init__(self, group, max_numel: int, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.max_numel, self.dtype, self.group_name = max_numel, dtype, group.group_name
        self.buffer = symm_mem.empty(2 * max_numel, dtype=dtype, device=device)
        self.buffer.zero_()
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)  # collective: every rank calls it
        self.halves = (self.buffer[:max_numel], self.buffer[max_numel:])

    def fits(self, t: torch.Tensor) -> bool:
        return t.is_cuda and t.dtype == self.dtype and t.numel() <= self.max_numel and t.is_contiguous()

    def __call__(self, t: torch.Tensor, half: int) -> torch.Tensor:
        """`half`: which buffer this call uses; callers alternate it between consecutive all-reduces."""
        buf = self.halves[half][: t.numel()]
        out = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, t.view(-1), "sum", self.group_name)
        return out.view(t.shape)


def set_up_reduce(mode: str, model, group, max_rows: int) -> tuple[str, SymmetricAllReduce | None]:
    """Resolve `mode` for this rank's model (a collective when it builds symmetric memory: every rank calls it
    at the same point, with the same arguments), float32 partial sums on half-precision GPUs included
    (`tp_shard.use_fp32_partials`). Returns (the mode in force, the reducer or None)."""
    if mode not in GRAPH_REDUCE_MODES:
        raise ValueError(f"TENSOR_PARALLEL_GRAPH_REDUCE must be one of {GRAPH_REDUCE_MODES}, not {mode!r}")
    from infrastructure.engine.tp_shard import use_fp32_partials

    dtype = torch.float32 if use_fp32_partials(model) else model.get_input_embeddings().weight.dtype
    if mode not in ("auto", "symm_mem"):
        return mode, None
    weight = model.get_input_embeddings().weight
    hidden = int(model.config.get_text_config().hidden_size)
    reducer, problem = None, ""
    try:
        reducer = SymmetricAllReduce(group, max_rows * hidden, dtype, weight.device)
        # one eager call: the peers' mappings and the kernel work before a graph holds them
        probe = torch.ones(1, hidden, dtype=dtype, device=weight.device)
        total = float(reducer(probe, 0)[0, 0])
        if total != dist.get_world_size(group):
            raise RuntimeError(f"symmetric all-reduce summed ones to {total}")
    except Exception as exc:
        reducer, problem = None, f"{type(exc).__name__}: {exc}"
    # every rank must take the same way (a rank capturing while another steps eagerly deadlocks)
    agreed = torch.tensor([0 if reducer is None else 1], device=weight.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    if int(agreed.item()) == 1:
        return "symm_mem", reducer
    if mode == "symm_mem":
        raise RuntimeError(f"TENSOR_PARALLEL_GRAPH_REDUCE=symm_mem failed on a rank: {problem or 'on a peer'}")
    log.warning("symmetric-memory all-reduce unavailable (%s): decode steps run eagerly", problem or "on a peer")
    return "off", None
