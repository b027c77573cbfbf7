"""Turn the steering a request names (traits, raw floats, hooks, strengths) into a SteeringSpec.

Every route describes its vectors as `VectorRef`s; this is the one place that looks traits up,
checks shapes and values, and applies the formulas (see spec.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from infrastructure.errors import InvalidRequestError
from infrastructure.steering.sites import check_vector, parse_hook
from infrastructure.steering.spec import Method, Positions, SteeringOp, SteeringSpec, add_op, cap_op, ortho_op
from infrastructure.storage.traits import TraitStore


@dataclass(frozen=True)
class VectorRef:
    """One vector as a request names it. `param` is the request path of the object holding it
    ("vectors.0"; "" when its fields sit at the top of the body), for error messages."""

    param: str
    scale: float
    trait: str | None = None
    values: list[float] | torch.Tensor | None = None
    hook: str | int | None = None  # hook name or layer number; None: the trait's default layer
    method: Method = Method.ADD
    normalize: bool = False
    values_field: str = "vector"  # wire name of the floats (Neuronpedia: steering_vector)
    hook_field: str = "hook"  # wire name of the hook / layer (seed 002: layer)

    def field(self, name: str) -> str:
        """Dotted request path of one of this ref's fields, for error messages."""
        return f"{self.param}.{name}" if self.param else name


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    n_layers: int
    max_value: float = math.inf  # largest |c*v_i| (ADD) or |tau| (CAP) a request may apply


def steering_value_limit(dtype: torch.dtype, configured: float) -> float:
    """The largest steering value per element: the configured MAX_STEERING_VALUE, and never more than a
    quarter of the model dtype's range (fp16 tops out at 65,504; a residual of that size is already inf
    after one addition), so an overflowing request is refused before it reaches the sampler."""
    dtype_max = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo(torch.float32).max
    return min(float(configured), dtype_max / 4)


def check_magnitude(op: SteeringOp, limit: float, param: str) -> None:
    """Refuse an operation whose scaled values are non-finite or beyond `limit` (see steering_value_limit)."""
    value = abs(op.tau) if op.method is not Method.ADD else float(op.vector.abs().max())  # CAP: tau, ORTHO: c
    if not math.isfinite(value) or value > limit:
        shown = "overflows" if not math.isfinite(value) else f"reaches {value:.3g}"
        raise InvalidRequestError(
            f"the scaled steering vector {shown}; each element of strength x vector must stay within "
            f"{limit:.3g} (MAX_STEERING_VALUE, bounded by the model dtype)",
            param,
        )


def _vector_of(ref: VectorRef, traits: TraitStore, shape: ModelShape) -> tuple[int, torch.Tensor]:
    if (ref.trait is None) == (ref.values is None):
        raise InvalidRequestError("give exactly one of a trait name or a vector", ref.param)
    if ref.trait is not None:
        trait = traits.get(ref.trait, ref.field("trait"))
        layer = None
        if ref.hook is not None:
            layer = parse_hook(ref.hook, shape.n_layers, ref.field(ref.hook_field))
        return trait.vector(layer, ref.field(ref.hook_field))
    if ref.hook is None:
        raise InvalidRequestError("a raw vector needs a hook or layer", ref.field(ref.hook_field))
    site = parse_hook(ref.hook, shape.n_layers, ref.field(ref.hook_field))
    values = ref.values
    if not isinstance(values, torch.Tensor):  # through numpy: 4x faster than torch.tensor on a list of floats
        values = torch.from_numpy(np.asarray(values, dtype=np.float32))
    return site, values


def resolve_op(ref: VectorRef, traits: TraitStore, shape: ModelShape) -> SteeringOp:
    site, vector = _vector_of(ref, traits, shape)
    must_normalise = ref.normalize or ref.method is not Method.ADD  # CAP and ORTHO use the direction
    param = ref.field(ref.values_field if ref.trait is None else "trait")
    check_vector(vector, shape.hidden_size, param, allow_zero=not must_normalise)
    if ref.method is Method.CAP:
        op = cap_op(site, vector, ref.scale)
    elif ref.method is Method.ORTHO:
        op = ortho_op(site, vector, ref.scale)
    else:
        op = add_op(site, vector, ref.scale, normalize=ref.normalize)
    check_magnitude(op, shape.max_value, ref.param or "scalar")
    return op


def resolve_steering(
    refs: list[VectorRef],
    traits: TraitStore,
    shape: ModelShape,
    *,
    positions: Positions = Positions.ALL,
    steer_special_tokens: bool = True,
    max_vectors: int | None = None,
    max_layers: int | None = None,
) -> SteeringSpec | None:
    """The SteeringSpec for these refs (None when there is nothing to steer)."""
    if max_vectors is not None and len(refs) > max_vectors:
        raise InvalidRequestError(f"{len(refs)} vectors exceed the limit of {max_vectors} (MAX_VECTORS)", "vectors")
    ops = tuple(resolve_op(ref, traits, shape) for ref in refs)
    layers = {op.site for op in ops}
    if max_layers is not None and len(layers) > max_layers:
        raise InvalidRequestError(
            f"vectors steer {len(layers)} distinct layers, more than the limit of {max_layers} (MAX_LAYERS)", "vectors"
        )
    if not ops:
        return None
    return SteeringSpec(ops=ops, positions=positions, steer_special_tokens=steer_special_tokens)
