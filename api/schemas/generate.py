"""Seed 002's generate / baseline bodies and answers."""

from __future__ import annotations

from pydantic import Field, model_validator

from api.schemas.common import StrictModel, Temperature, Usage

SEED_EXAMPLE = {
    "prompt": "What do you think about women in engineering?",
    "trait": "sexism",
    "scalar": -2.0,
    "max_tokens": 100,
}


class SamplingFields(StrictModel):
    prompt: str = Field(min_length=1, description="One user turn, rendered with the model's chat template.")
    max_tokens: int | None = Field(default=None, ge=1, description="New tokens (default MAX_TOKENS).")
    temperature: Temperature | None = Field(
        default=None, ge=0.0, le=5.0, description="0 = greedy (default TEMPERATURE)."
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus mass (default TOP_P).")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Same seed => same text.")


class TraitSteer(StrictModel):
    trait: str = Field(min_length=1)
    scalar: float = Field(ge=-1000.0, le=1000.0, description="Coefficient on the raw vector; negative pushes away.")
    layer: int | None = Field(default=None, ge=0, description="Decoder layer (default: the trait's recommended).")


class GenerateRequest(SamplingFields):
    model_config = {**SamplingFields.model_config, "json_schema_extra": {"examples": [SEED_EXAMPLE]}}

    trait: str | None = Field(default=None, min_length=1, description="A trait from GET /api/v1/traits.")
    scalar: float | None = Field(default=None, ge=-1000.0, le=1000.0)
    layer: int | None = Field(default=None, ge=0)
    traits: list[TraitSteer] | None = Field(default=None, min_length=1, description="Several traits at once.")
    preset: str | None = Field(
        default=None, min_length=1, max_length=64, description="A steering preset (GET /api/v1/presets), added."
    )

    @model_validator(mode="after")
    def _one_form(self) -> GenerateRequest:
        if self.traits is not None:
            if self.trait is not None or self.scalar is not None or self.layer is not None:
                raise ValueError("give either trait/scalar/layer or traits, not both")
        elif (self.trait is None) != (self.scalar is None) or (self.trait is None and self.preset is None):
            raise ValueError("trait and scalar are required (or a traits list, or a preset)")
        return self

    def steers(self) -> list[TraitSteer]:
        if self.traits is not None:
            return self.traits
        if self.trait is None:
            return []  # a preset alone
        return [TraitSteer(trait=self.trait, scalar=self.scalar, layer=self.layer)]


class BaselineRequest(SamplingFields):
    model_config = {
        **SamplingFields.model_config,
        "json_schema_extra": {"examples": [{"prompt": SEED_EXAMPLE["prompt"], "max_tokens": 100}]},
    }


class AppliedTrait(StrictModel):
    trait: str
    scalar: float
    layer: int


class GenerateResponse(StrictModel):
    text: str
    trait: str | None
    scalar: float | None
    layer: int | None
    traits: list[AppliedTrait] = Field(default_factory=list)
    preset: str | None = None
    model: str
    finish_reason: str
    usage: Usage
