"""Neuronpedia's other steering route, POST /v1/steer/completion: a raw text prompt (no chat template)."""

from __future__ import annotations

from pydantic import Field

from api.schemas.common import StrictModel
from api.schemas.steer_wire import SteerKnobs

EXAMPLE = {
    "prompt": "The most important thing in life is",
    "types": ["STEERED", "DEFAULT"],
    "vectors": [{"hook": "blocks.15.hook_resid_post", "strength": 40.0, "steering_vector": [0.05] * 4}],
    "strength_multiplier": 1.0,
    "seed": 42,
    "temperature": 0,
    "freq_penalty": 0.0,
    "n_completion_tokens": 16,
    "steer_method": "SIMPLE_ADDITIVE",
    "normalize_steering": False,
}


class CompletionRequest(SteerKnobs):
    """Neuronpedia's SteerCompletionRequest in either casing; the prompt is tokenised as is."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [EXAMPLE]}}

    prompt: str = Field(min_length=1, max_length=1_000_000, description="Text to complete (no chat template).")
