"""Neuronpedia's steered completion-chat (seed 000): request body, frames, and RunPod's envelope."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from api.schemas.common import StrictModel, Temperature

SteerType = Literal["STEERED", "DEFAULT"]

SEED_EXAMPLE = {
    "prompt": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you?"},
    ],
    "types": ["DEFAULT"],
    "vectors": [],
    "strength_multiplier": 1.0,
    "seed": 42,
    "temperature": 0.7,
    "freq_penalty": 0.0,
    "n_completion_tokens": 32,
    "steer_method": "SIMPLE_ADDITIVE",
    "normalize_steering": False,
    "steer_special_tokens": False,
}


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class SteerVector(StrictModel):
    """One vector: raw floats (`steering_vector`, with a `hook`) or a stored trait (`trait`, hook optional)."""

    hook: str | None = Field(default=None, max_length=100, examples=["blocks.15.hook_resid_post"])
    strength: float = Field(ge=-1e6, le=1e6, description="Coefficient c (ADD) or cap tau (PROJECTION_CAP).")
    steering_vector: list[float] | None = Field(default=None, max_length=65536)
    trait: str | None = Field(default=None, min_length=1, max_length=200, description="A stored trait instead.")

    @model_validator(mode="after")
    def _one_source(self) -> SteerVector:
        if (self.steering_vector is None) == (self.trait is None):
            raise ValueError("give exactly one of steering_vector or trait")
        return self


class CompletionChatRequest(StrictModel):
    """The seed's body; also accepted wrapped as `{"input": {...}}`."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [SEED_EXAMPLE]}}

    prompt: list[ChatMessage] = Field(min_length=1, max_length=1000)
    types: list[SteerType] = Field(default_factory=lambda: ["DEFAULT"], min_length=1, max_length=2)
    vectors: list[SteerVector] = Field(default_factory=list, max_length=256)
    strength_multiplier: float = Field(default=1.0, ge=-1e6, le=1e6)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    temperature: Temperature = Field(default=0.7, ge=0.0, le=5.0, description="0 = greedy.")
    freq_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI-style frequency penalty.")
    n_completion_tokens: int = Field(default=512, ge=1, le=1_000_000, description="Max new tokens.")
    steer_method: Literal["SIMPLE_ADDITIVE", "PROJECTION_CAP"] = "SIMPLE_ADDITIVE"
    normalize_steering: bool = False
    steer_special_tokens: bool = False
    stream: bool = True

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        if isinstance(data, dict) and set(data) == {"input"} and isinstance(data["input"], dict):
            return data["input"]
        return data

    @field_validator("types")
    @classmethod
    def _no_repeats(cls, types: list[str]) -> list[str]:
        if len(set(types)) != len(types):
            raise ValueError("types must not repeat")
        return types


class RunSyncRequest(StrictModel):
    """RunPod's envelope around a completion-chat body."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [{"input": SEED_EXAMPLE}]}}

    input: CompletionChatRequest
    id: str | None = Field(default=None, max_length=200)


class RunSyncResponse(StrictModel):
    id: str
    status: Literal["COMPLETED"] = "COMPLETED"
    output: list[dict[str, Any]]
