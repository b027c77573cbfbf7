"""Steering presets: create, list, show and delete them, find one by `model` name, and resolve the steering
of a request that goes through one (the preset's vectors plus the request's own)."""

from __future__ import annotations

import time

from pydantic import ValidationError

from api.schemas.openai import SteeringIn
from api.schemas.presets import PresetCreateRequest, PresetDeleted, PresetList, PresetOut
from api.services.checks import model_shape, served_ids
from api.services.ports import Serving
from infrastructure.errors import InvalidRequestError, PresetExistsError, RegistryFullError, UnknownPresetError
from infrastructure.steering.resolve import VectorRef, resolve_steering
from infrastructure.steering.spec import Method, Positions, SteeringSpec
from infrastructure.storage.presets import PRESETS, Preset


def steering_refs(steering: SteeringIn, prefix: str) -> list[VectorRef]:
    """The OpenAI `steering` object's vectors as VectorRefs (errors name e.g. `{prefix}.0.layer`)."""
    return [
        VectorRef(
            param=f"{prefix}.{i}",
            scale=v.scale,
            trait=v.trait,
            values=v.vector,
            hook=v.hook if v.hook is not None else v.layer,
            method=Method(steering.method),
            normalize=steering.normalize,
            values_field="vector",
            hook_field="hook" if v.hook is not None else "layer",
        )
        for i, v in enumerate(steering.vectors)
    ]


def preset_steering(preset: Preset) -> SteeringIn:
    """A stored preset's steering, validated again (a file edited by hand may be wrong)."""
    try:
        return SteeringIn.model_validate(preset.steering)
    except ValidationError as exc:
        raise InvalidRequestError(f"preset {preset.name!r} holds an invalid steering object: {exc}", "model") from exc


def find_preset(runtime: Serving, name: str | None) -> Preset | None:
    """The preset a `model` name selects (None: not a preset name)."""
    return runtime.presets.presets.get(name) if name is not None else None


def preset_refs(preset: Preset | None) -> tuple[list[VectorRef], Positions]:
    """A preset's vectors (errors name `model.steering.vectors.i...`) and positions; none for no preset."""
    if preset is None:
        return [], Positions.ALL
    stored = preset_steering(preset)
    return steering_refs(stored, "model.steering.vectors"), Positions(stored.positions)


def resolve_refs(
    runtime: Serving, refs: list[VectorRef], positions: Positions = Positions.ALL, steer_special_tokens: bool = True
) -> SteeringSpec | None:
    """`refs` resolved against the registry and the served model, within the server's vector and layer limits."""
    s = runtime.settings
    return resolve_steering(
        refs,
        runtime.traits,
        model_shape(runtime),
        positions=positions,
        steer_special_tokens=steer_special_tokens,
        max_vectors=s.max_vectors,
        max_layers=s.max_layers,
    )


def combined_steering(
    runtime: Serving,
    steering: SteeringIn | None,
    preset: Preset | None,
    prefix: str = "steering.vectors",
    steer_special_tokens: bool = True,
) -> SteeringSpec | None:
    """One SteeringSpec from a preset's vectors followed by the request's own. `positions` is the request's
    when it sets it, else the preset's."""
    refs, positions = preset_refs(preset)
    if steering is not None:
        refs += steering_refs(steering, prefix)
        if preset is None or "positions" in steering.model_fields_set:
            positions = Positions(steering.positions)
    return resolve_refs(runtime, refs, positions, steer_special_tokens)


def _out(runtime: Serving, preset: Preset) -> PresetOut:
    persisted = preset.path is not None and preset.path.is_file()
    return PresetOut(**preset.as_json(), persisted=persisted, model=runtime.loaded.model_id)


def create_preset(runtime: Serving, body: PresetCreateRequest) -> PresetOut:
    """Check the name (free, not a served model id) and that the steering resolves on this model, then keep it."""
    runtime.require_engine()
    store = runtime.presets
    if body.name.lower() in {i.lower() for i in served_ids(runtime)}:
        raise InvalidRequestError(f"{body.name!r} is the served model's id; pick another preset name", "name")
    if body.name in store.presets and not body.overwrite:
        raise PresetExistsError(f"a preset named {body.name!r} exists; send overwrite: true to replace it", "name")
    if body.name not in store.presets and len(store.presets) >= runtime.settings.presets_max:
        raise RegistryFullError(f"{runtime.settings.presets_max} presets exist (PRESETS_MAX); delete one", "name")
    if not body.steering.vectors:
        raise InvalidRequestError("a preset steers with at least one vector", "steering.vectors")
    combined_steering(runtime, body.steering, None)  # refuses what a request through it would be refused
    preset = Preset(
        body.name,
        body.steering.model_dump(mode="json"),
        body.description,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    old = store.presets.get(body.name)
    if body.persist:
        store.write(runtime.settings.vectors_dir / PRESETS, preset)
    elif old is not None and old.path is not None and old.path.is_file():
        old.path.unlink()  # the new in-memory preset must not be undone by a restart
    store.presets[body.name] = preset
    return _out(runtime, preset)


def preset_named(runtime: Serving, name: str, param: str = "preset") -> Preset:
    """The preset of that name (404 naming `param` otherwise)."""
    preset = runtime.presets.presets.get(name)
    if preset is None:
        raise UnknownPresetError(f"no preset named {name!r} (GET /api/v1/presets)", param)
    return preset


def _get(runtime: Serving, name: str) -> Preset:
    runtime.require_engine()
    return preset_named(runtime, name, "name")


def list_presets(runtime: Serving) -> PresetList:
    runtime.require_engine()
    return PresetList(presets=[_out(runtime, p) for _, p in sorted(runtime.presets.presets.items())])


def show_preset(runtime: Serving, name: str) -> PresetOut:
    return _out(runtime, _get(runtime, name))


def delete_preset(runtime: Serving, name: str) -> PresetDeleted:
    _get(runtime, name)
    removed = runtime.presets.forget(name)
    return PresetDeleted(name=name, deleted=True, file_removed=removed)
