"""OpenAI's legacy completions (POST /v1/completions): the request fields served, with the `steering`
extension, and the text_completion objects. This is what evaluation harnesses call for log-likelihoods:
`echo` + `logprobs` (+ `max_tokens: 0`) scores every prompt token."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from api.schemas.common import StrictModel, Temperature, Usage
from api.schemas.openai import SteeringIn
from api.schemas.openai_extras import (
    CompletionLogprobs,
    IgnoredFields,
    ResponseFormat,
    StreamOptions,
    check_stop,
    stop_strings,
)

MAX_PROMPTS = 256  # prompts x n rows of one request, at most

EXAMPLE = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "prompt": "The capital of France is",
    "max_tokens": 0,
    "echo": True,
    "logprobs": 1,
    "temperature": 0,
}

# Legacy fields that would change the answer and are not implemented: a 400 naming the field.
UNSUPPORTED_COMPLETION_FIELDS = ("suffix", "logit_bias")


class CompletionsRequest(IgnoredFields):
    """Every optional field also accepts null, meaning its default."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [EXAMPLE]}}

    model: str | None = Field(
        default=None, max_length=300, description="The served model id, or a steering preset's name (GET /v1/models)."
    )
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids, or lists of token ids (no chat template; one choice set per prompt)."
    )
    max_tokens: int | None = Field(default=None, ge=0, description="New tokens (default 16); 0 with echo: score only.")
    echo: bool | None = Field(default=None, description="Return the prompt before the completion (and its logprobs).")
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="Return each token's logprob and this many top candidates per token."
    )
    n: int | None = Field(default=None, ge=1, le=64, description="Completions per prompt (default 1).")
    best_of: int | None = Field(default=None, ge=1, le=64, description="Only equal to n (no server-side ranking).")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Choice j samples with seed + j.")
    temperature: Temperature | None = Field(default=None, ge=0.0, le=2.0, description="0 = greedy (default: setting).")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(default=None, description="Extension: json_object / json_schema.")
    steering: SteeringIn | None = Field(
        default=None, description="Extension: steer with traits or raw vectors (added to a preset's)."
    )
    suffix: str | None = Field(default=None, description="Not implemented: only null or empty (else a 400).")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not implemented: only null or {}.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop: Any) -> Any:
        return check_stop(stop)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("give at least one prompt")
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def stop_strings(self) -> tuple[str, ...]:
        return stop_strings(self.stop)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "cancelled"] | str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
