"""Trait vectors in seed 002's layout, checked against the loaded model.

`data/vectors/{trait}.json` = {"trait_name", "model_name", "vectors": {"<layer>": [floats]}, "metadata": {...}},
layer k meaning the output of decoder layer k (`blocks.k.hook_resid_post`). Files that do not fit
the loaded model are skipped with the reason, never a crash.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infrastructure.errors import HookOutOfRangeError, UnknownTraitError
from infrastructure.steering.layers import layer_number

log = logging.getLogger(__name__)


@dataclass
class Trait:
    name: str
    model_name: str
    vectors: dict[int, torch.Tensor]
    metadata: dict
    source: Path
    prompts_file: Path | None = None
    description: str = ""

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def default_layer(self) -> int:
        layer = self.metadata.get("recommended_layer")
        if isinstance(layer, int) and layer in self.vectors:
            return layer
        return self.layers[len(self.layers) // 2]

    def norms(self) -> dict[int, float]:
        return {layer: round(float(v.norm()), 4) for layer, v in sorted(self.vectors.items())}

    def vector(self, layer: int | None, param: str = "layer") -> tuple[int, torch.Tensor]:
        layer = self.default_layer if layer is None else layer
        if layer not in self.vectors:
            raise HookOutOfRangeError(
                f"trait {self.name!r} has no vector for layer {layer}; it has {self.layers}", param
            )
        return layer, self.vectors[layer]


@dataclass
class TraitStore:
    traits: dict[str, Trait] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why

    def get(self, name: str, param: str = "trait") -> Trait:
        trait = self.traits.get(name)
        if trait is None:  # the names are listed by GET /api/v1/traits, not echoed into every 404
            raise UnknownTraitError(f"unknown trait {name!r}; GET /api/v1/traits lists the available ones", param)
        return trait

    def add(self, trait: Trait) -> None:
        self.traits[trait.name] = trait


def _parse(path: Path, prompts_dir: Path, model_ids: set[str], hidden: int, n_layers: int) -> Trait:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("vectors") or {}, dict):
        raise ValueError("not a trait file: expected an object with a 'vectors' object")
    name = data.get("trait_name") or path.stem
    if not isinstance(name, str):
        raise ValueError("trait_name is not a string")
    model_name = str(data.get("model_name", ""))
    if model_ids and model_name not in model_ids:
        raise ValueError(f"extracted for {model_name or 'an unnamed model'}, loaded {sorted(model_ids)[0]}")
    vectors: dict[int, torch.Tensor] = {}
    for key, values in (data.get("vectors") or {}).items():
        layer, vec = layer_number(key), torch.tensor(values, dtype=torch.float32)
        if vec.shape != (hidden,):
            raise ValueError(f"layer {key} vector has {vec.numel()} values, the model's hidden size is {hidden}")
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is outside the model's layers 0..{n_layers - 1}")
        if not torch.isfinite(vec).all():
            raise ValueError(f"layer {key} vector has non-finite values")
        vectors[layer] = vec
    if not vectors:
        raise ValueError("no vectors")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    prompts = prompts_dir / f"{name}_trait.json"
    description = metadata.get("description", "")
    if prompts.is_file() and not description:
        description = json.loads(prompts.read_text()).get("description", "")
    return Trait(name, model_name, vectors, metadata, path, prompts if prompts.is_file() else None, description)


def load_traits(vectors_dir: Path, prompts_dir: Path, model_ids: set[str], hidden: int, n_layers: int) -> TraitStore:
    """Every `*.json` under vectors_dir that fits this model (hidden size, layers, model id).

    A file that cannot be used, whatever the reason, is skipped and reported (by its path relative to
    vectors_dir, so /status does not reveal the server's directory layout); it never fails the start."""
    store = TraitStore()
    root = Path(vectors_dir)
    for path in sorted(root.rglob("*.json")):
        shown = path.relative_to(root).as_posix()
        try:
            trait = _parse(path, Path(prompts_dir), model_ids, hidden, n_layers)
        except Exception as exc:  # noqa: BLE001 - one bad file must not keep the server unhealthy
            store.skipped[shown] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if trait.name in store.traits:
            kept = store.traits[trait.name].source.relative_to(root).as_posix()
            store.skipped[shown] = f"duplicate trait {trait.name!r} (kept {kept})"
            continue
        store.add(trait)
    log.info("traits loaded: %s; skipped: %d", sorted(store.traits), len(store.skipped))
    return store
