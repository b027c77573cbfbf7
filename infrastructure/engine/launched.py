"""A paged-engine step whose forward is queued on the device and not yet collected."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infrastructure.engine.runner import Work


@dataclass
class Launched:
    """A step whose forward is queued: its rows and their works, the rows in their prompt, the outputs."""

    items: list  # (PagedRow, tokens fed) per row
    works: list[Work]
    prefill: list
    logits: torch.Tensor | None
    captured: dict
    scored: list  # prompt scoring: (row, first position, its logits)
    num_tokens: int
    started: float
    planned: torch.Tensor | None = None  # greedy rows: tokens and flags queued behind the forward (plan_greedy)
    advanced: bool = False  # a chained step (overlap.py) already moved its rows past this step's input
    ready: torch.cuda.Event | None = None  # recorded behind the copies of `planned` and `captured` to the host
