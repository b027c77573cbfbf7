"""Steering presets: a named steering configuration that OpenAI-compatible tools select as a `model` name.

A preset is plain JSON (the OpenAI route's `steering` object, a description, when it was made). Presets
live in memory; with `persist` they are also written to `VECTORS_DIR/presets/{name}.json` (atomically),
which start-up loads again, like registered vectors. Trait names inside a preset are resolved when a
request uses it, so a preset follows the registry (a deleted vector makes the preset's requests a 400)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PRESETS = "presets"


@dataclass
class Preset:
    name: str
    steering: dict  # the OpenAI `steering` object, as validated JSON
    description: str = ""
    created_at: str = ""
    path: Path | None = None  # the file it is persisted in (None: in memory only)

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "steering": self.steering,
            "description": self.description,
            "created_at": self.created_at,
        }


@dataclass
class PresetStore:
    presets: dict[str, Preset] = field(default_factory=dict)

    def write(self, folder: Path, preset: Preset) -> None:
        """Persist `preset` to folder/{name}.json atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{preset.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(preset.as_json(), allow_nan=False))
        os.replace(tmp, path)
        preset.path = path

    def forget(self, name: str) -> bool:
        """Drop a preset; True when its file was removed too."""
        preset = self.presets.pop(name)
        if preset.path is not None and preset.path.is_file():
            preset.path.unlink()
            return True
        return False


def load_presets(folder: Path) -> PresetStore:
    """Every readable `*.json` preset in `folder` (an unreadable file is logged and skipped)."""
    store = PresetStore()
    if not folder.is_dir():
        return store
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            extra = (str(data.get("description", "")), str(data.get("created_at", "")))
            preset = Preset(data["name"], dict(data["steering"]), *extra, path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping preset file %s: %s", path.name, exc)
            continue
        store.presets[preset.name] = preset
    return store
