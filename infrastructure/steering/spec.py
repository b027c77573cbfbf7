"""Steering as data: what a request asks to do to the residual stream, independent of hooks and batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class Method(str, Enum):
    ADD = "add"  # h <- h + c*v
    CAP = "cap"  # h <- h - max(0, h.u - tau) * u   (u = v/|v|)
    ORTHO = "ortho"  # h <- h - (h.u)u + c(h.u)u       (u = v/|v|; Neuronpedia's ORTHOGONAL_DECOMP)


class Positions(str, Enum):
    ALL = "all"
    PROMPT = "prompt"
    RESPONSE = "response"


@dataclass(frozen=True)
class SteeringOp:
    """One operation on the output of one site.

    `site` is a decoder layer index L (its output, `blocks.L.hook_resid_post`) or -1 for the
    embeddings (the input of layer 0, `blocks.0.hook_resid_pre`). For ADD, `vector` is the
    already-scaled delta c*v; for CAP it is the unit direction u and `tau` the cap; for ORTHO it is
    the unit direction u and `tau` the coefficient c kept on it.
    """

    site: int
    method: Method
    vector: torch.Tensor
    tau: float = 0.0


@dataclass(frozen=True)
class SteeringSpec:
    """Everything one row's steering does: its operations and where in the sequence they apply."""

    ops: tuple[SteeringOp, ...] = ()
    positions: Positions = Positions.ALL
    steer_special_tokens: bool = True

    def is_empty(self) -> bool:
        return not self.ops


def add_op(site: int, vector: torch.Tensor, coefficient: float, normalize: bool = False) -> SteeringOp:
    """ADD operation c*v (v scaled to unit norm first when `normalize`)."""
    v = vector.detach().to(torch.float32)
    if normalize:
        v = v / v.norm()
    return SteeringOp(site=site, method=Method.ADD, vector=v * float(coefficient))


def cap_op(site: int, vector: torch.Tensor, tau: float) -> SteeringOp:
    """PROJECTION_CAP operation: the projection on u = v/|v| is capped at tau."""
    v = vector.detach().to(torch.float32)
    return SteeringOp(site=site, method=Method.CAP, vector=v / v.norm(), tau=float(tau))


def ortho_op(site: int, vector: torch.Tensor, coefficient: float) -> SteeringOp:
    """ORTHOGONAL_DECOMP: h = (I-P)h + P h along u = v/|v| becomes (I-P)h + c*P h (c = 1: unchanged)."""
    v = vector.detach().to(torch.float32)
    return SteeringOp(site=site, method=Method.ORTHO, vector=v / v.norm(), tau=float(coefficient))


@dataclass(frozen=True)
class Capture:
    """Ask the engine to record, per position, the projection h.u at a site (after any steering there)."""

    name: str
    site: int
    direction: torch.Tensor = field(repr=False)
