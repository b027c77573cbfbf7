"""Neuronpedia's steered completion-chat (seed 000 and both webapp generations): request body and
RunPod's envelope. Field names are snake_case here; camelCase is accepted (see steer_wire.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from api.schemas.common import StrictModel
from api.schemas.steer_wire import BothCasings, SteerKnobs

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

# Neuronpedia's extra roles, rendered with the chat template as the role they stand for
ROLE_AS = {"model": "assistant", "developer": "system"}


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "model", "developer"] = Field(
        description="`model` (Gemma's name) is rendered as assistant, `developer` (OpenAI's) as system."
    )
    content: str = Field(max_length=1_000_000)


class CompletionChatRequest(SteerKnobs):
    """The seed's body (snake_case) or the current webapp's (camelCase); also accepted wrapped as `{"input": {...}}`."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [SEED_EXAMPLE]}}

    prompt: list[ChatMessage] = Field(min_length=1, max_length=1000)
    steer_special_tokens: bool = False
    is_assistant_axis: bool | None = Field(
        default=None, description="Absent: the final frame carries `assistant_axis` (seed 000); false: it does not."
    )

    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        if isinstance(data, dict) and set(data) == {"input"} and isinstance(data["input"], dict):
            return data["input"]
        return data


class RunPodPolicy(BothCasings):
    """RunPod's per-request `policy`; `executionTimeout` (ms) bounds the run, the others are queue settings."""

    model_config = {**StrictModel.model_config, "extra": "allow"}

    execution_timeout: int | None = Field(default=None, ge=1, description="Milliseconds.")
    low_priority: bool | None = None
    ttl: int | None = Field(default=None, ge=1, description="Milliseconds (queue lifetime; nothing to do here).")


class RunSyncRequest(BothCasings):
    """RunPod's envelope around a completion-chat body, with RunPod's request fields."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [{"input": SEED_EXAMPLE}]}}

    input: CompletionChatRequest
    id: str | None = Field(default=None, max_length=200)
    webhook: str | None = Field(default=None, max_length=2000, description="POSTed the job's result when it ends.")
    policy: RunPodPolicy | None = None
    s3_config: dict[str, Any] | None = Field(default=None, description="Accepted; results are never uploaded.")


class RunSyncResponse(StrictModel):
    id: str
    status: Literal["COMPLETED"] = "COMPLETED"
    output: list[dict[str, Any]]
