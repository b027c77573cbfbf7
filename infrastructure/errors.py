"""Typed domain errors raised below the HTTP layer; `app/errors.py` maps each to a status code."""

from __future__ import annotations


class PersonaError(Exception):
    """Base of every error this service raises on purpose. `param` names the request field at fault."""

    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(PersonaError):
    """A request that is well-formed JSON but cannot be served as asked."""


class InvalidJSONError(InvalidRequestError):
    """A body that is not JSON this server parses (malformed, nested too deep, duplicate keys, lone surrogates)."""

    type = "invalid_json"


class ReadOnlyTraitError(PersonaError):
    """A shipped trait cannot be replaced or deleted through the API (it is every user's trait)."""

    type = "read_only_trait"


class RegistryFullError(PersonaError):
    """The registry holds REGISTRY_MAX_VECTORS vectors already."""

    type = "registry_full"


class UnknownTraitError(PersonaError):
    type = "unknown_trait"


class UnknownVectorError(PersonaError):
    type = "unknown_vector"


class UnknownModelError(PersonaError):
    """A request named a model this server does not serve (OpenAI's `model_not_found`)."""

    type = "model_not_found"


class VectorExistsError(PersonaError):
    """A vector or trait of that name is already registered (send `overwrite: true` to replace it)."""

    type = "vector_exists"


class InvalidHookError(PersonaError):
    """A hook name that is not `blocks.L.hook_resid_post` / `blocks.L.hook_resid_pre` or a layer number."""

    type = "invalid_hook"


class HookOutOfRangeError(InvalidHookError):
    type = "hook_out_of_range"


class VectorShapeError(PersonaError):
    type = "vector_shape"


class NonFiniteVectorError(PersonaError):
    type = "non_finite_vector"


class TokenLimitError(PersonaError):
    type = "token_limit"


class QueueFullError(PersonaError):
    type = "queue_full"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailableError(PersonaError):
    """The engine is loading, shutting down, or broken."""

    type = "engine_unavailable"


class GenerationError(PersonaError):
    """Generation failed inside the engine (a fault in the batch this request was part of)."""

    type = "generation_error"


class RequestTimeoutError(PersonaError):
    type = "timeout"


class ModelLoadError(PersonaError):
    """The configured model cannot be loaded (missing files, bad device, unsupported settings)."""

    type = "model_load_error"


class PersonaDataError(PersonaError):
    type = "persona_data_error"


class UnknownPresetError(UnknownVectorError):
    """No steering preset of that name (a 404, like an unknown vector)."""

    type = "unknown_preset"


class PresetExistsError(VectorExistsError):
    """A steering preset of that name exists (send `overwrite: true` to replace it)."""

    type = "preset_exists"
