"""The vector registry: vectors registered at run time become traits, usable by name everywhere.

A registered vector is a `Trait` in `runtime.traits` (so `trait: name` works in every steering
route), tagged `origin: registry` in its metadata. With `persist`, it is also written in seed 002's
trait-file format to `VECTORS_DIR/registry/{name}.json`, which start-up loads again."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from api.schemas.vectors import (
    RegistryOptions,
    VectorCreateRequest,
    VectorDeleted,
    VectorDetail,
    VectorList,
    VectorSummary,
)
from api.services.checks import model_shape
from api.services.ports import Serving
from api.services.traits import trait_summary
from infrastructure.errors import (
    HookOutOfRangeError,
    InvalidHookError,
    InvalidRequestError,
    ReadOnlyTraitError,
    RegistryFullError,
    UnknownVectorError,
    VectorExistsError,
)
from infrastructure.steering.sites import EMBEDDINGS_SITE, check_vector, parse_hook
from infrastructure.storage.control_vectors import (
    LAYER_CONVENTION,
    ControlVectorFile,
    read_control_vector,
    vectors_from_floats,
)
from infrastructure.storage.traits import Trait

REGISTRY = "registry"


def registry_dir(runtime: Serving) -> Path:
    return Path(runtime.settings.vectors_dir) / REGISTRY


def is_registered(trait: Trait) -> bool:
    return trait.metadata.get("origin") == REGISTRY


def _persisted(trait: Trait) -> bool:
    return Path(trait.source).is_file()


def _summary(trait: Trait) -> dict:
    registered = is_registered(trait)
    persisted = _persisted(trait)
    return trait_summary(trait) | {
        "origin": REGISTRY if registered else "shipped",
        "format": trait.metadata.get("format") if registered else None,
        "persisted": persisted,
        # relative to VECTORS_DIR: answers never reveal the server's directory layout
        "file": f"{REGISTRY}/{Path(trait.source).name}" if persisted and registered else None,
    }


def _check_name(runtime: Serving, opts: RegistryOptions) -> Trait | None:
    """The registered vector this registration replaces (None if the name is free). Shipped traits are
    read-only: replacing one would change it for every user of the server."""
    existing = runtime.traits.traits.get(opts.name)
    if existing is None:
        limit = runtime.settings.registry_max_vectors
        if sum(map(is_registered, runtime.traits.traits.values())) >= limit:
            raise RegistryFullError(
                f"the registry holds {limit} vectors (REGISTRY_MAX_VECTORS); delete one first", "name"
            )
        return None
    if not is_registered(existing):
        raise ReadOnlyTraitError(
            f"{opts.name!r} is a shipped trait; shipped traits are read-only through the API, pick another name",
            "name",
        )
    if not opts.overwrite:
        raise VectorExistsError(
            f"a registered vector named {opts.name!r} exists; send overwrite: true to replace it", "name"
        )
    return existing


def _check_vectors(runtime: Serving, vectors: dict[int, torch.Tensor], params: dict[int, tuple[str, str]]) -> None:
    """Every layer in range, every vector of the model's hidden size, finite and within MAX_STEERING_VALUE;
    errors name the field."""
    shape = model_shape(runtime)
    limit = runtime.settings.max_steering_value
    for layer, vector in vectors.items():
        layer_param, values_param = params[layer]
        if not 0 <= layer < shape.n_layers:
            raise HookOutOfRangeError(
                f"layer {layer} is out of range: the model has layers 0..{shape.n_layers - 1}", layer_param
            )
        check_vector(vector, shape.hidden_size, values_param)
        biggest = float(vector.abs().max())
        if biggest > limit:
            raise InvalidRequestError(
                f"a value reaches {biggest:.3g}; registered vectors stay within {limit:.3g} (MAX_STEERING_VALUE)",
                values_param,
            )


def _write(path: Path, trait: Trait) -> None:
    """Seed 002's trait-file format, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "trait_name": trait.name,
        "model_name": trait.model_name,
        "vectors": {str(layer): v.tolist() for layer, v in sorted(trait.vectors.items())},
        "metadata": trait.metadata,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, allow_nan=False))  # a file other parsers can read: no NaN
    os.replace(tmp, path)


def _register(runtime: Serving, opts: RegistryOptions, vectors: dict[int, torch.Tensor], meta: dict) -> VectorDetail:
    replaced = _check_name(runtime, opts)
    if opts.default_layer is not None and opts.default_layer not in vectors:
        raise HookOutOfRangeError(f"default_layer {opts.default_layer} is not among {sorted(vectors)}", "default_layer")
    metadata = {
        "origin": REGISTRY,
        "description": opts.description,
        "layer_convention": LAYER_CONVENTION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
    }
    if opts.default_layer is not None:
        metadata["recommended_layer"] = opts.default_layer
    path = registry_dir(runtime) / f"{opts.name}.json"
    source = path if opts.persist else Path(f"<registry:{opts.name}>")
    trait = Trait(opts.name, runtime.loaded.model_id, vectors, metadata, source, description=opts.description)
    if opts.persist:
        _write(path, trait)
    elif replaced is not None and is_registered(replaced) and _persisted(replaced):
        Path(replaced.source).unlink()  # the new in-memory vector must not be undone by a restart
    runtime.traits.add(trait)
    return vector_detail(runtime, opts.name)


def create_from_json(runtime: Serving, body: VectorCreateRequest) -> VectorDetail:
    runtime.require_engine()
    if body.vector is not None:
        if body.hook is not None:
            layer = parse_hook(body.hook, model_shape(runtime).n_layers, "hook")
            if layer == EMBEDDINGS_SITE:
                raise InvalidHookError("the embeddings (blocks.0.hook_resid_pre) cannot be registered", "hook")
        else:
            layer = body.layer
        vectors = vectors_from_floats({layer: body.vector})
        params = {layer: ("hook" if body.hook is not None else "layer", "vector")}
    else:
        vectors = vectors_from_floats(dict(body.vectors))
        params = {layer: (f"vectors.{layer}", f"vectors.{layer}") for layer in vectors}
    _check_vectors(runtime, vectors, params)
    return _register(runtime, body, vectors, {"format": "json"})


def parse_upload(runtime: Serving, data: bytes) -> ControlVectorFile:
    """Parse and check a control-vector file (CPU work on a few MB: the route runs it off the event loop)."""
    parsed = read_control_vector(data, "file")
    _check_vectors(runtime, parsed.vectors, {layer: ("file", "file") for layer in parsed.vectors})
    return parsed


def create_from_file(
    runtime: Serving, opts: RegistryOptions, parsed: ControlVectorFile, filename: str | None
) -> VectorDetail:
    """Register a parsed repeng / llama.cpp control vector (GGUF or safetensors), all its layers."""
    runtime.require_engine()
    meta = {"format": parsed.format, "filename": (filename or "")[:200] or None, "file_metadata": parsed.metadata}
    return _register(runtime, opts, parsed.vectors, meta)


def list_vectors(runtime: Serving) -> VectorList:
    runtime.require_engine()
    traits = sorted(runtime.traits.traits.values(), key=lambda t: t.name)
    return VectorList(vectors=[VectorSummary(**_summary(t)) for t in traits if is_registered(t)])


def vector_detail(runtime: Serving, name: str, values: bool = False, layer: int | None = None) -> VectorDetail:
    """A registered vector or shipped trait; its floats with `values` (only `layer` when given)."""
    runtime.require_engine()
    trait = runtime.traits.get(name, "name")
    floats = None
    if values:
        if layer is not None and layer not in trait.vectors:
            raise HookOutOfRangeError(f"{name!r} has no vector for layer {layer}; it has {trait.layers}", "layer")
        chosen = [layer] if layer is not None else trait.layers
        floats = {k: trait.vectors[k].tolist() for k in chosen}
    return VectorDetail(**_summary(trait), norms=trait.norms(), metadata=trait.metadata, values=floats)


def delete_vector(runtime: Serving, name: str) -> VectorDeleted:
    runtime.require_engine()
    trait = runtime.traits.traits.get(name)
    if trait is None:
        raise UnknownVectorError(f"no registered vector named {name!r}", "name")
    if not is_registered(trait):
        raise ReadOnlyTraitError(f"{name!r} is a shipped trait; only registered vectors can be deleted", "name")
    removed = False
    if _persisted(trait) and Path(trait.source).parent.resolve() == registry_dir(runtime).resolve():
        Path(trait.source).unlink()
        removed = True
    del runtime.traits.traits[name]
    return VectorDeleted(name=name, deleted=True, file_removed=removed)


def check_name_free(runtime: Serving, opts: RegistryOptions) -> None:
    """Refuse now what `register_computed` would refuse later (before spending time computing a vector)."""
    _check_name(runtime, opts)


def register_computed(runtime: Serving, opts: RegistryOptions, vectors: dict[int, torch.Tensor], meta: dict):
    """Register vectors computed by the server itself (e.g. extraction): the same checks and storage as a
    registration by floats or file."""
    _check_vectors(runtime, vectors, {layer: ("name", "name") for layer in vectors})
    return _register(runtime, opts, vectors, meta)
