"""Hooks are plumbing: per-row steering tables for a batch, and closures that apply them.

A batch's steering becomes, per site, dense tensors with one row per batch row (zero rows for
unsteered requests), so one hook per site serves every row in one vectorised step:

    ADD   h <- h + mask * delta                      delta [B,1,H]
    CAP   h <- h - mask * max(0, h.u - tau) * u      u [B,1,H], tau [B,1,1]  (u = 0: no-op)
    ORTHO h <- h + mask * (c - 1) * (h.u) * u        u [B,1,H], c - 1 [B,1,1] (u = 0: no-op)

ORTHO is Neuronpedia's ORTHOGONAL_DECOMP, h - (h.u)u + c(h.u)u written as one update. At a site,
adds are applied first, then orthogonal decompositions, then caps. `mask` [B,T,1] is set by the engine
for every forward.
A zero delta / zero u leaves a row bit-identical to an unhooked forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from infrastructure.steering.sites import site_module
from infrastructure.steering.spec import Capture, Method, SteeringSpec

HOOK_MARK = "_persona_serving_hook"


@dataclass
class SiteTable:
    add: torch.Tensor | None = None  # [B,1,H]
    caps: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (u [B,1,H], tau [B,1,1])
    orthos: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (u [B,1,H], c-1 [B,1,1])
    captures: list[torch.Tensor] = field(default_factory=list)  # directions [B,1,H], one per capture slot

    @property
    def steers(self) -> bool:
        return self.add is not None or bool(self.caps) or bool(self.orthos)


@dataclass
class BatchSteering:
    """The steering state of one batch: site tables (fixed while the batch is unchanged) and the
    per-forward position mask and capture outputs (set and read by the engine around each forward)."""

    tables: dict[int, SiteTable]
    mask: torch.Tensor | None = None  # [B,T] bool, set before each forward
    captured: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (site, slot) -> [B,T]
    apply: Callable | None = None  # the function applying a site's tables (apply_table, or it compiled)
    _masks_by_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    @property
    def steers(self) -> bool:
        """Whether any site changes the residual stream (captures alone need no position mask)."""
        return any(t.steers for t in self.tables.values())

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._masks_by_device = {}
        self.captured = {}

    def mask_for(self, like: torch.Tensor) -> torch.Tensor:
        """The position mask as [B,T,1] on the device and dtype of a hidden state."""
        key = like.device
        cached = self._masks_by_device.get(key)
        if cached is None or cached.dtype != like.dtype:
            # contiguous: a slice of a fixed buffer (a decode graph's [1, max_rows] mask) would keep the buffer's
            # row stride, and the compiled steering function's guards would see a new layout (a recompile)
            mask = self.mask.to(device=like.device, dtype=like.dtype, memory_format=torch.contiguous_format)
            cached = mask.unsqueeze(-1)
            self._masks_by_device[key] = cached
        return cached


def build_tables(
    specs: Sequence[SteeringSpec | None],
    captures: Sequence[Sequence[Capture]],
    hidden_size: int,
    device_of: Callable[[int], torch.device],
    dtype: torch.dtype,
) -> dict[int, SiteTable]:
    """Turn each row's SteeringSpec and Captures into dense per-site tables for a batch of len(specs)."""
    batch = len(specs)
    tables: dict[int, SiteTable] = {}

    def table(site: int) -> SiteTable:
        return tables.setdefault(site, SiteTable())

    def zeros(site: int, last: int = hidden_size) -> torch.Tensor:
        return torch.zeros(batch, 1, last, dtype=dtype, device=device_of(site))

    slots: dict[tuple[int, int, Method], int] = {}
    for row, spec in enumerate(specs):
        for op in spec.ops if spec else ():
            t = table(op.site)
            vec = op.vector.to(device=device_of(op.site), dtype=dtype)
            if op.method is Method.ADD:
                if t.add is None:
                    t.add = zeros(op.site)
                t.add[row, 0] += vec
                continue
            pairs = t.caps if op.method is Method.CAP else t.orthos
            slot = slots.get((row, op.site, op.method), 0)
            slots[(row, op.site, op.method)] = slot + 1
            while len(pairs) <= slot:
                pairs.append((zeros(op.site), zeros(op.site, 1)))
            pairs[slot][0][row, 0] = vec
            pairs[slot][1][row, 0, 0] = op.tau if op.method is Method.CAP else op.tau - 1.0
    for row, row_captures in enumerate(captures):
        capture_slots: dict[int, int] = {}
        for cap in row_captures:
            t = table(cap.site)
            slot = capture_slots.get(cap.site, 0)
            capture_slots[cap.site] = slot + 1
            while len(t.captures) <= slot:
                t.captures.append(torch.zeros(batch, 1, hidden_size, dtype=torch.float32, device=device_of(cap.site)))
            t.captures[slot][row, 0] = cap.direction.to(device=device_of(cap.site), dtype=torch.float32)
    return tables


def apply_table(hidden: torch.Tensor, mask, add, orthos: list, caps: list, directions: list = ()) -> tuple:
    """One site's steering on hidden [B,T,H] (mask [B,T,1]): adds, then orthogonal decompositions, then caps;
    then the projections [B,T] of the result on each capture direction (float32). Pure tensors in and out,
    so `torch.compile` can fuse it (compiled_step.py) with the tables as inputs."""
    if add is not None:
        hidden = hidden + add * mask
    for u, keep in orthos:
        along = (hidden * u).sum(-1, keepdim=True)
        hidden = hidden + (keep * along * mask) * u
    for u, tau in caps:
        excess = ((hidden * u).sum(-1, keepdim=True) - tau).clamp_min(0)
        hidden = hidden - (excess * mask) * u
    return hidden, [(hidden.float() * direction).sum(-1) for direction in directions]


def make_site_hook(site: int, table: SiteTable, state: BatchSteering) -> Callable:
    """A forward hook applying one site's table; accepts tensor or tuple outputs (transformers 4.x/5.x)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        hidden = output[0] if isinstance(output, tuple) else output
        mask = state.mask_for(hidden) if table.steers else None  # captures alone need no position mask
        apply = state.apply or apply_table
        hidden, projections = apply(hidden, mask, table.add, table.orthos, table.caps, table.captures)
        for slot, projection in enumerate(projections):
            state.captured[(site, slot)] = projection
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    setattr(hook, HOOK_MARK, True)
    return hook


class HookSet:
    """Context manager registering one hook per site all-or-nothing, and removing exactly its own."""

    def __init__(self, model: nn.Module, state: BatchSteering) -> None:
        self.model = model
        self.state = state
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> HookSet:
        try:
            for site, table in sorted(self.state.tables.items()):
                hook = make_site_hook(site, table, self.state)
                self.handles.append(site_module(self.model, site).register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def our_hooks(model: nn.Module) -> list[str]:
    """Names of modules that still carry a hook of ours (should always be empty between steps)."""
    found = []
    for name, module in model.named_modules():
        for hook in list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values()):
            if getattr(hook, HOOK_MARK, False):
                found.append(name)
    return found
