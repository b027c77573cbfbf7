"""Neuronpedia's steering wire, both generations: the fields `/v1/steer/completion-chat` and
`/v1/steer/completion` share, accepted in snake_case (seed 000, the previous webapp) or camelCase
(the current webapp: `steeringVector`, `nCompletionTokens`, ...), with the caller's casing recorded
so answers can be written back in it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic.alias_generators import to_camel

from api.schemas.common import StrictModel, Temperature

SteerType = Literal["STEERED", "DEFAULT"]
SteerMethod = Literal["SIMPLE_ADDITIVE", "PROJECTION_CAP", "ORTHOGONAL_DECOMP"]
SEED_LIMIT = 2.0**63


def snake_keys(model: type[StrictModel], data: Any) -> tuple[Any, bool | None]:
    """`data` with each camelCase field name of `model` renamed to its snake_case name, and the casing
    it shows: True (camelCase only), False (snake_case only), None (neither: no name differs; or both).
    Both spellings of one field are accepted when they carry the same value (the previous webapp sent
    every vector's floats as `steering_vector` and `steeringVector`); different values are refused."""
    if not isinstance(data, dict):
        return data, None
    out, camel, snake = dict(data), False, False
    for name in model.model_fields:
        alias = to_camel(name)
        if alias == name:
            continue
        snake = snake or name in out
        if alias not in out:
            continue
        camel = True
        value = out.pop(alias)
        if name in out and out[name] != value:
            raise ValueError(f"`{name}` and `{alias}` are the same field and carry different values")
        out[name] = value
    return out, (camel if camel != snake else None)


class BothCasings(StrictModel):
    """A wire object read in either casing; `camel` says whether the caller wrote camelCase."""

    _camel: bool | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _either_casing(cls, data: Any, handler: Any) -> Any:
        renamed, camel = snake_keys(cls, cls._unwrap(data))
        instance = handler(renamed)
        if isinstance(instance, BothCasings):
            instance._camel = camel
        return instance

    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        """Hook for envelopes (a body sent as `{"input": {...}}`); identity here."""
        return data

    @property
    def camel(self) -> bool:
        """camelCase answers: the object's own keys decide; when they read the same in both casings,
        its vectors do (camelCase only when some vector used `steeringVector` alone)."""
        if self._camel is not None:
            return self._camel
        vectors = getattr(self, "vectors", None) or ()
        return any(v._camel is True for v in vectors)


class SteerVector(BothCasings):
    """One vector: raw floats (`steering_vector` / `steeringVector`, with a `hook`) or a stored trait."""

    hook: str | None = Field(default=None, max_length=100, examples=["blocks.15.hook_resid_post"])
    strength: float = Field(ge=-1e6, le=1e6, description="Coefficient c (ADD, ORTHO) or cap tau (PROJECTION_CAP).")
    steering_vector: list[float] | None = Field(default=None, max_length=65536)
    trait: str | None = Field(default=None, min_length=1, max_length=200, description="A stored trait instead.")

    @model_validator(mode="after")
    def _one_source(self) -> SteerVector:
        if (self.steering_vector is None) == (self.trait is None):
            raise ValueError("give exactly one of steering_vector or trait")
        return self


class SteerFeature(BothCasings):
    """An SAE feature (Neuronpedia's NPSteerFeature). This server holds no SAE weights: the feature
    steers only with its `steering_vector`, at the residual hook its `source` names."""

    model: str = Field(max_length=200, description="Neuronpedia model id of the SAE (not checked).")
    source: str = Field(min_length=1, max_length=200, examples=["20-gemmascope-res-16k", "6-res-jb"])
    index: int = Field(ge=0)
    strength: float = Field(ge=-1e6, le=1e6)
    steering_vector: list[float] | None = Field(default=None, max_length=65536)


class SteerKnobs(BothCasings):
    """The fields both steering routes share (Neuronpedia's SteerCompletionRequest minus the prompt)."""

    model: str | None = Field(default=None, max_length=200, description="Checked against the served model.")
    types: list[SteerType] = Field(default_factory=lambda: ["DEFAULT"], min_length=1, max_length=2)
    vectors: list[SteerVector] | None = Field(default=None, max_length=256)
    features: list[SteerFeature] | None = Field(default=None, max_length=256)
    strength_multiplier: float = Field(default=1.0, ge=-1e6, le=1e6)
    seed: float | None = Field(default=None, ge=-SEED_LIMIT, lt=SEED_LIMIT, description="Integer or float.")
    temperature: Temperature = Field(default=0.7, ge=0.0, le=5.0, description="0 = greedy.")
    freq_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI-style frequency penalty.")
    n_completion_tokens: int = Field(default=512, ge=1, le=1_000_000, description="Max new tokens.")
    steer_method: SteerMethod = "SIMPLE_ADDITIVE"
    normalize_steering: bool = False
    stream: bool | None = Field(default=None, description="Absent: SSE unless `Accept` prefers application/json.")
    n_logprobs: int | None = Field(default=0, ge=0, le=10, description="Top candidates per generated token.")

    @field_validator("types")
    @classmethod
    def _no_repeated_types(cls, types: list[str]) -> list[str]:
        if len(set(types)) != len(types):
            raise ValueError("types must not repeat")
        return types

    @property
    def int_seed(self) -> int | None:
        """The seed as the generator takes it: truncated like Neuronpedia's `int(seed)`, negative
        values wrapped into [0, 2^63)."""
        return None if self.seed is None else int(self.seed) % (2**63)
