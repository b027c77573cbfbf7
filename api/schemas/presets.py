"""Steering presets: bodies and answers of /api/v1/presets."""

from __future__ import annotations

from pydantic import BaseModel, Field

from api.schemas.common import StrictModel
from api.schemas.openai import SteeringIn

PRESET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

EXAMPLE = {
    "name": "smol-helpful",
    "steering": {"vectors": [{"trait": "helpfulness", "scale": 4.0}], "method": "add"},
    "description": "SmolLM2 pushed towards helpfulness",
}


class PresetCreateRequest(StrictModel):
    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [EXAMPLE]}}

    name: str = Field(pattern=PRESET_NAME, description="The `model` name tools will send: letters, digits, _ . -")
    steering: SteeringIn = Field(description="The steering every request through this preset gets (OpenAI form).")
    description: str = Field(default="", max_length=2000)
    persist: bool = Field(default=False, description="Also write data/vectors/presets/{name}.json (reloaded at start).")
    overwrite: bool = Field(default=False, description="Replace an existing preset of that name.")


class PresetOut(BaseModel):
    name: str
    steering: dict
    description: str
    created_at: str
    persisted: bool
    model: str = Field(description="The served model the preset steers.")


class PresetList(BaseModel):
    presets: list[PresetOut]


class PresetDeleted(BaseModel):
    name: str
    deleted: bool
    file_removed: bool
