"""POST /api/v1/vectors/extract: a steering vector computed by the loaded model from contrastive examples."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from api.schemas.common import StrictModel
from api.schemas.vectors import NAME_PATTERN, VectorDetail

MIN_EXAMPLES, MAX_EXAMPLES = 8, 64  # per side; one in four validates, so at least 6 fit and 2 validate
MAX_CHARS = 1000
MAX_CANDIDATE_LAYERS = 8

EXTRACT_EXAMPLE = {
    "name": "pirate",
    "description": "talks like a pirate",
    "pairs": [
        {
            "question": f"Question {i}?",
            "positive": "Arr, matey, hoist the sails and fetch me rum!",
            "negative": "Hello, here is a plain and polite answer.",
        }
        for i in range(8)
    ],
}


class ContrastivePair(StrictModel):
    question: str = Field(min_length=1, max_length=MAX_CHARS)
    positive: str = Field(min_length=1, max_length=MAX_CHARS, description="An answer expressing the trait.")
    negative: str = Field(min_length=1, max_length=MAX_CHARS, description="An answer free of the trait.")


class ExtractRequest(StrictModel):
    """Either `pairs` (question, trait-expressing answer, trait-free answer), or two sets of texts
    `positive` / `negative`. One example in four (indices 3, 7, ...) is held out to choose the layer and
    the scalar range; the rest are fitted."""

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [EXTRACT_EXAMPLE]}}

    name: str = Field(pattern=NAME_PATTERN, description="Registry name: lower-case letters, digits, '_' and '-'.")
    description: str = Field(default="", max_length=2000)
    pairs: list[ContrastivePair] | None = Field(default=None, min_length=MIN_EXAMPLES, max_length=MAX_EXAMPLES)
    positive: list[str] | None = Field(default=None, min_length=MIN_EXAMPLES, max_length=MAX_EXAMPLES)
    negative: list[str] | None = Field(default=None, min_length=MIN_EXAMPLES, max_length=MAX_EXAMPLES)
    layers: list[int] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CANDIDATE_LAYERS,
        description="Candidate layers to validate (default: 5 spread over the middle of the model).",
    )
    persist: bool = Field(default=False, description="Also write data/vectors/registry/{name}.json.")
    overwrite: bool = Field(default=False, description="Replace a registered vector of that name.")
    stream: bool = Field(default=False, description="SSE: `progress` events, then one `result` (or `error`).")

    @model_validator(mode="after")
    def _one_form(self) -> ExtractRequest:
        texts = self.positive is not None or self.negative is not None
        if (self.pairs is None) == (not texts):
            raise ValueError("give exactly one of pairs, or positive and negative texts")
        if texts and (self.positive is None or self.negative is None):
            raise ValueError("texts need both positive and negative")
        for side in (self.positive or []) + (self.negative or []):
            if not side.strip() or len(side) > MAX_CHARS:
                raise ValueError(f"every text needs 1..{MAX_CHARS} characters and not only spaces")
        return self


class LayerScore(BaseModel):
    layer: int
    scalar: float
    margin_minus: float
    margin_plus: float
    rise_per_unit: float


class RangePoint(BaseModel):
    fraction: float
    scalar: float
    margin_minus: float
    margin_plus: float
    ppl_ratio_minus: float
    ppl_ratio_plus: float
    fluent: bool


class ExtractValidation(BaseModel):
    """Measured on the held-out split: margin = mean log-prob per token of positive minus negative answers."""

    probe_fraction: float
    baseline_margin: float
    layers: list[LayerScore]
    chosen_layer: int
    fluency_guard: dict
    range: list[RangePoint]
    top_fraction: float


class ExtractResponse(BaseModel):
    vector: VectorDetail  # the registered vector; `values` holds the recommended layer's floats
    recommended_layer: int
    recommended_scalar: float
    recommended_scalar_range: list[float]
    validation: ExtractValidation
    split: dict
    seconds: float
