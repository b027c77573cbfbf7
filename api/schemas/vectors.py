"""The vector registry: register steering vectors (floats or a control-vector file) under a name."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from api.schemas.common import StrictModel
from infrastructure.steering.layers import layer_number

NAME_PATTERN = r"^[a-z0-9_-]{1,64}$"
MAX_FLOATS = 65536

EMBEDDED_HIDDEN_SIZE = 576  # the embedded SmolLM2-135M's; the served schema uses the loaded model's (api/openapi.py)


def json_example(hidden_size: int = EMBEDDED_HIDDEN_SIZE) -> dict:
    """A registration the server accepts as is: one vector of the model's hidden size at layer 15."""
    return {
        "name": "my-direction",
        "layer": 15,
        "vector": [0.01] * hidden_size,
        "description": "a direction found with my own probe",
        "persist": False,
    }


class RegistryOptions(StrictModel):
    """What every registration takes, whether the vectors come as JSON or as a file."""

    name: str = Field(pattern=NAME_PATTERN, description="Lower-case letters, digits, '_' and '-', 1-64 characters.")
    description: str = Field(default="", max_length=2000)
    default_layer: int | None = Field(default=None, ge=0, description="Layer used when a request names none.")
    persist: bool = Field(
        default=False, description="Also write data/vectors/registry/{name}.json (reloaded at start)."
    )
    overwrite: bool = Field(default=False, description="Replace an existing vector or shipped trait of that name.")


class VectorCreateRequest(RegistryOptions):
    """JSON registration: one vector (`vector` + `layer` or `hook`) or several (`vectors` by layer)."""

    vector: list[float] | None = Field(default=None, min_length=1, max_length=MAX_FLOATS)
    layer: int | None = Field(default=None, ge=0, description="Decoder layer whose output the vector steers.")
    hook: str | None = Field(default=None, max_length=100, examples=["blocks.15.hook_resid_post"])
    vectors: dict[int, list[float]] | None = Field(default=None, min_length=1, max_length=1024)

    @field_validator("vectors", mode="before")
    @classmethod
    def _canonical_layers(cls, value: object) -> object:
        """Layer keys in one spelling ("10", not "010" or "+10"), so two keys never merge into one layer."""
        if isinstance(value, dict):
            for key in value:
                layer_number(key)
        return value

    @model_validator(mode="after")
    def _one_form(self) -> VectorCreateRequest:
        if (self.vector is None) == (self.vectors is None):
            raise ValueError("give exactly one of vector (with layer or hook) or vectors ({layer: floats})")
        if self.vector is not None and (self.layer is None) == (self.hook is None):
            raise ValueError("a vector needs exactly one of layer or hook")
        if self.vectors is not None and (self.layer is not None or self.hook is not None):
            raise ValueError("vectors are keyed by layer: drop layer / hook")
        return self


class VectorSummary(BaseModel):
    name: str
    description: str
    layers: list[int]
    default_layer: int
    model: str
    origin: str  # "registry" | "shipped"
    format: str | None = None  # json | safetensors | gguf (registry only)
    persisted: bool
    file: str | None = None


class VectorList(BaseModel):
    vectors: list[VectorSummary]


class VectorDetail(VectorSummary):
    norms: dict[int, float]
    metadata: dict
    values: dict[int, list[float]] | None = Field(
        default=None, description="The floats per layer, with ?values=true (one layer with &layer=N)."
    )


class VectorDeleted(BaseModel):
    name: str
    deleted: bool
    file_removed: bool
