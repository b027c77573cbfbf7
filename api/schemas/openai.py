"""OpenAI-compatible chat completions: the request fields served, the `steering` extension, and the
chat.completion / chat.completion.chunk / model-list objects."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from api.schemas.common import StrictModel, Temperature, Usage
from api.schemas.openai_extras import (
    ChoiceLogprobs,
    IgnoredFields,
    ResponseFormat,
    StreamOptions,
    check_stop,
    stop_strings,
)

# OpenAI fields this server does not implement (they would change the answer): refused with a 400 naming the
# field, never ignored. `logit_bias: {}` and `modalities: ["text"]` ask for nothing and pass.
UNSUPPORTED_FIELDS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "verbosity",
)

EXAMPLE = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "messages": [{"role": "user", "content": "Tell me about your day."}],
    "max_tokens": 40,
    "temperature": 0,
    "steering": {"vectors": [{"trait": "helpfulness", "scale": 4.0}], "method": "add"},
    "persona_monitoring": True,
}


class TextPart(StrictModel):
    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class ChatMessageIn(StrictModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="`developer` is read as `system`.")
    content: str | list[TextPart] = Field(description="A string, or OpenAI content parts of type `text`.")
    name: str | None = Field(default=None, max_length=64, description="Accepted and ignored.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class SteeringVectorIn(StrictModel):
    """One vector: a trait / registered vector by name, or raw floats; at a layer or a hook."""

    trait: str | None = Field(default=None, min_length=1, max_length=200)
    vector: list[float] | None = Field(default=None, min_length=1, max_length=65536)
    scale: float = Field(ge=-1e6, le=1e6, description="Coefficient c (add) or cap tau (cap).")
    layer: int | None = Field(default=None, ge=0, description="Decoder layer L (= blocks.L.hook_resid_post).")
    hook: str | None = Field(default=None, max_length=100, examples=["blocks.15.hook_resid_post"])

    @model_validator(mode="after")
    def _one_each(self) -> SteeringVectorIn:
        if (self.trait is None) == (self.vector is None):
            raise ValueError("give exactly one of trait or vector")
        if self.layer is not None and self.hook is not None:
            raise ValueError("give layer or hook, not both")
        return self


class SteeringIn(StrictModel):
    vectors: list[SteeringVectorIn] = Field(default_factory=list, max_length=256)
    method: Literal["add", "cap"] = "add"
    normalize: bool = Field(default=False, description="Scale each vector to unit norm first (add).")
    positions: Literal["all", "prompt", "response"] = Field(
        default="all",
        description="Where the vectors apply: every position, the prompt's tokens only (the answer is then "
        "generated unsteered from a steered context), or the generated tokens only.",
    )


REFUSED_DOC = "Not implemented: only null or an empty value (anything else is a 400 naming the field)."


class RefusedFields(StrictModel):
    """OpenAI fields that would change the answer and are not implemented. Declared so that null or an empty
    value passes the strict schema; `refuse_unsupported` turns anything else into a 400 naming the field."""

    tools: list[Any] | None = Field(default=None, description=REFUSED_DOC)
    tool_choice: Any = Field(default=None, description=REFUSED_DOC)
    functions: list[Any] | None = Field(default=None, description=REFUSED_DOC)
    function_call: Any = Field(default=None, description=REFUSED_DOC)
    logit_bias: dict[str, float] | None = Field(default=None, description=REFUSED_DOC)
    audio: Any = Field(default=None, description=REFUSED_DOC)
    modalities: list[str] | None = Field(default=None, description='Only ["text"].')
    prediction: Any = Field(default=None, description=REFUSED_DOC)
    reasoning_effort: Any = Field(default=None, description=REFUSED_DOC)
    web_search_options: Any = Field(default=None, description=REFUSED_DOC)
    verbosity: Any = Field(default=None, description=REFUSED_DOC)


class ChatCompletionRequest(IgnoredFields, RefusedFields):
    """Every optional field also accepts null, meaning its default."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [EXAMPLE]}}

    model: str | None = Field(
        default=None, max_length=300, description="The served model id, or a steering preset's name (GET /v1/models)."
    )
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1000)
    n: int | None = Field(default=None, ge=1, le=64, description="Choices, generated as rows of one batch (default 1).")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Choice i samples with seed + i.")
    temperature: Temperature | None = Field(
        default=None, ge=0.0, le=2.0, description="0 = greedy (default TEMPERATURE)."
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Wins over max_tokens.")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(default=None, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="With logprobs: this many candidates.")
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object / json_schema: the answer is enforced to follow it while sampling."
    )
    steering: SteeringIn | None = Field(
        default=None, description="Extension: steer with traits or raw vectors (added to a preset's)."
    )
    persona_monitoring: bool | None = Field(default=None, description="Extension: add `assistant_axis` to the answer.")

    def stop_strings(self) -> tuple[str, ...]:
        return stop_strings(self.stop)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop: Any) -> Any:  # before the union, so every `stop` error names `stop`
        return check_stop(stop)


class AxisTurn(BaseModel):
    pc_values: dict[str, float | None]
    snippet: str
    non_finite: bool | None = Field(default=None, description="True when the turn's value was NaN/inf (null).")


class AssistantAxisEntry(BaseModel):
    type: str  # "completion"
    index: int  # the choice
    pc_titles: list[str]
    turns: list[AxisTurn]


class MessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: MessageOut
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    assistant_axis: list[AssistantAxisEntry] | None = None
    assistant_axis_unavailable: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "persona-serving"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def unsupported_field(body: Any) -> str | None:
    """The first OpenAI field in a raw body that this server refuses (None: none). Empty values that ask
    for nothing (`tools: []`, `logit_bias: {}`, `modalities: ["text"]`) pass."""
    if not isinstance(body, dict):
        return None
    for name in UNSUPPORTED_FIELDS:
        value = body.get(name)
        if value is None or value in ([], {}, "none") or (name == "modalities" and value == ["text"]):
            continue
        return name
    return None
