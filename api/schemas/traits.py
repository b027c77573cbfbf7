"""Trait listings and service status."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TraitSummary(BaseModel):
    name: str
    description: str
    layers: list[int]
    default_layer: int
    model: str
    recommended_scalar: float | None = Field(
        default=None, description="Strength at default_layer chosen at extraction (None: not recorded)."
    )
    recommended_scalar_range: list[float] | None = Field(
        default=None, description="[-top, top]: the fluency-guarded range at default_layer (playground sliders)."
    )


class TraitsResponse(BaseModel):
    traits: list[TraitSummary]


class TraitDetail(TraitSummary):
    norms: dict[int, float]
    metadata: dict
    vector_file: str
    prompts_file: str | None


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None


class StatusResponse(BaseModel):
    status: str
    model: str | None
    weights: str | None
    source: str | None
    devices: list[str]
    dtype: str | None
    quantization: str | None
    hidden_size: int | None
    layers: int | None
    context_length: int | None
    traits: list[str]
    traits_skipped: dict[str, str]
    persona_monitoring: bool
    persona_monitoring_detail: str | None
    queue_depth: int
    active_requests: int
    engine: dict
    hooks_attached: int = 0  # modules holding a hook of ours right now (0 whenever no forward runs)
    load_seconds: float | None
    uptime_s: float
    error: str | None = None
