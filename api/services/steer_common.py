"""What Neuronpedia's two steering routes share: the `model` check, vectors and SAE features as one
SteeringSpec, sampling settings, per-token logprobs as NPLogprob, and the SSE-or-JSON decision."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from api.schemas.steer_wire import SteerKnobs
from api.services.checks import check_new_tokens, served_ids
from api.services.ports import Serving
from api.services.presets import find_preset, preset_refs, resolve_refs
from infrastructure.engine.job import SamplingParams, TokenLogprob
from infrastructure.errors import InvalidRequestError, UnknownModelError
from infrastructure.steering.resolve import VectorRef
from infrastructure.steering.spec import Method, SteeringSpec

METHODS = {"SIMPLE_ADDITIVE": Method.ADD, "PROJECTION_CAP": Method.CAP, "ORTHOGONAL_DECOMP": Method.ORTHO}
_SOURCE = re.compile(r"^(\d+)-(.+)$")


def check_model(runtime: Serving, requested: str | None) -> None:
    """A `model` naming the served model (any of its ids, case-insensitively) or a steering preset (whose
    vectors then steer the STEERED rows) passes; others are a 404."""
    if requested is None or requested.lower() in {i.lower() for i in served_ids(runtime)}:
        return
    if find_preset(runtime, requested) is not None:
        return
    names = ", ".join(repr(i) for i in served_ids(runtime))
    raise UnknownModelError(f"model {requested!r} is not served here; this server serves {names}", "model")


def source_hook(source: str, param: str) -> str:
    """The residual hook an SAE source id names: `L-<set>`; sets trained on the residual stream are
    `...res...`. SAELens's `res-jb` sets read `blocks.L.hook_resid_pre`; every other `res` set (Gemma
    Scope, Llama Scope, ...) `blocks.L.hook_resid_post`."""
    match = _SOURCE.match(source.strip())
    if match is None:
        raise InvalidRequestError(f"SAE source {source!r} does not start with a layer number ('20-res-jb')", param)
    layer, name = int(match.group(1)), match.group(2).lower()
    if "res" not in name or "mid" in name:
        raise InvalidRequestError(
            f"SAE source {source!r} is not a residual-stream set: only `L-...res...` sources can be steered here", param
        )
    return f"blocks.{layer}.hook_resid_pre" if name.startswith("res-jb") else f"blocks.{layer}.hook_resid_post"


def vector_refs(body: SteerKnobs) -> list[VectorRef]:
    """The body's vectors, then its SAE features (which must carry their decoder row as `steering_vector`)."""
    method = METHODS[body.steer_method]
    common = {"method": method, "normalize": body.normalize_steering, "values_field": "steering_vector"}
    refs = [
        VectorRef(
            param=f"vectors.{i}",
            scale=body.strength_multiplier * v.strength,
            trait=v.trait,
            values=v.steering_vector,
            hook=v.hook,
            **common,
        )
        for i, v in enumerate(body.vectors or ())
    ]
    for i, f in enumerate(body.features or ()):
        if f.steering_vector is None:
            raise InvalidRequestError(
                f"feature {f.source}/{f.index} has no steering_vector and SAE weights are not served here: "
                "send the feature's decoder vector as `steering_vector` (or use `vectors`)",
                f"features.{i}.steering_vector",
            )
        hook = source_hook(f.source, f"features.{i}.source")
        scale = body.strength_multiplier * f.strength
        refs.append(VectorRef(param=f"features.{i}", scale=scale, values=f.steering_vector, hook=hook, **common))
    return refs


def resolve_body_steering(runtime: Serving, body: SteerKnobs, steer_special_tokens: bool) -> SteeringSpec | None:
    """The vectors of the preset `model` names (if any), then the request's vectors and features, as one
    SteeringSpec (None when there are none); a STEERED type without any is a 400."""
    refs, positions = preset_refs(find_preset(runtime, body.model))
    refs += vector_refs(body)
    if "STEERED" in body.types and not refs:
        raise InvalidRequestError("STEERED needs at least one vector or feature", "vectors")
    if not refs:
        return None
    return resolve_refs(runtime, refs, positions, steer_special_tokens)


def sampling_of(runtime: Serving, body: SteerKnobs) -> SamplingParams:
    """One SamplingParams for every row; without a seed one is drawn so STEERED and DEFAULT share it."""
    seed = body.int_seed if body.seed is not None else random.getrandbits(63)
    return SamplingParams(
        max_new_tokens=check_new_tokens(runtime, body.n_completion_tokens, "n_completion_tokens"),
        temperature=body.temperature,
        top_p=1.0,
        seed=seed,
        frequency_penalty=body.freq_penalty,
        n_logprobs=body.n_logprobs or 0,
    )


def np_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> list[dict]:
    """Engine logprobs as Neuronpedia's NPLogprob (snake_case): `{token, logprob, top_logprobs: [{token, logprob}]}`."""
    return [
        {
            "token": tokenizer.decode([e.token_id]),
            "logprob": e.logprob,
            "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": v} for t, v in e.top],
        }
        for e in entries
    ]


def wants_stream(stream: bool | None, accept: str | None) -> bool:
    """`stream` when sent; absent, SSE unless the Accept header names application/json and not
    text/event-stream (curl's `*/*`, no header, or an SSE client all get the seed's default stream)."""
    if stream is not None:
        return stream
    accept = (accept or "").lower()
    return not ("application/json" in accept and "text/event-stream" not in accept)
