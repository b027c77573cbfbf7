"""What both OpenAI routes (chat and legacy completions) share beyond steering: the harmless fields current
SDKs and frameworks send (accepted and ignored), `stop`, `response_format`, and the logprobs objects."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from api.schemas.common import StrictModel

IGNORED_DOC = "Accepted and ignored (sent by OpenAI SDKs and frameworks; it does not change the answer here)."

# Fields accepted and ignored on the OpenAI routes (README: "Lenient where OpenAI is lenient").
IGNORED_FIELDS = (
    "parallel_tool_calls",
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "user",
    "stream_options.include_obfuscation",
)


class IgnoredFields(StrictModel):
    """OpenAI request fields that change nothing on this server: declared so the strict schema accepts them."""

    parallel_tool_calls: bool | None = Field(default=None, description=IGNORED_DOC)
    store: bool | None = Field(default=None, description=IGNORED_DOC)
    metadata: dict[str, str] | None = Field(default=None, max_length=16, description=IGNORED_DOC)
    service_tier: str | None = Field(default=None, max_length=64, description=IGNORED_DOC)
    prompt_cache_key: str | None = Field(default=None, max_length=1024, description=IGNORED_DOC)
    safety_identifier: str | None = Field(default=None, max_length=1024, description=IGNORED_DOC)
    user: str | None = Field(default=None, max_length=1024, description=IGNORED_DOC)


class StreamOptions(StrictModel):
    include_usage: bool | None = None
    include_obfuscation: bool | None = Field(default=None, description=IGNORED_DOC)


def check_stop(stop: Any) -> Any:
    """`stop`: a string or up to 4 strings; checked before the union so every error names `stop`."""
    if stop is None or isinstance(stop, str):
        return stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of strings")
    if len(stop) > 4:
        raise ValueError("at most 4 strings")
    return stop


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return tuple(s for s in stops if s)


class JsonSchemaFormat(StrictModel):
    name: str = Field(default="response", max_length=64)
    description: str | None = Field(default=None, max_length=2000)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema", description="A JSON Schema (draft 2020-12).")
    strict: bool | None = Field(default=None, description="Accepted; the schema is always enforced.")


class ResponseFormat(StrictModel):
    """`text` (no constraint), `json_object` (any JSON object) or `json_schema` (a JSON value following the
    schema), enforced token by token while sampling."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("json_schema.schema is required with type json_schema")
        return self


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI chat `logprobs` of a choice: one entry per generated token."""

    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI legacy completions `logprobs`: parallel lists over the choice's tokens (prompt tokens first with
    `echo`; the first prompt token has no logprob: null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]
