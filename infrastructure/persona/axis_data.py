"""The assistant axis on disk (safetensors + JSON, never pickle) and in memory.

Folder `PERSONA_DATA_PATH/<model id>/`:
  assistant_axis.safetensors  axis [L,H]           mean(default assistant) - mean(role means), per layer
                              default_mean [L,H], role_mean [L,H]   (optional for converted data)
                              pca_components [K,H], pca_mean [H], pca_explained_variance [K]  (axis layer)
                              monitor_direction [H] unit vector, positive = assistant-like
                              monitor_center [H]    subtracted before projecting
  assistant_axis.json         model_id, hidden_size, n_layers, axis_layer, pc_title, source, ...

A turn's monitoring value is (mean of its activations at axis_layer - center) . direction, which by
linearity equals mean(h . direction) - center . direction: one dot product per position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from infrastructure.errors import PersonaDataError

PC_TITLE = "- Role-playing ↔️ + Assistant-like"
TENSORS = "assistant_axis.safetensors"
META = "assistant_axis.json"


@dataclass
class AssistantAxis:
    model_id: str
    layer: int  # decoder layer whose output is projected (blocks.layer.hook_resid_post)
    direction: torch.Tensor  # [H], unit
    center: torch.Tensor  # [H]
    title: str = PC_TITLE
    meta: dict = field(default_factory=dict)

    @property
    def offset(self) -> float:
        """center . direction, subtracted from a mean projection."""
        return float(self.center @ self.direction)

    def value(self, projections: list[float]) -> float | None:
        """Turn value from per-position projections h.direction (None for an empty turn)."""
        if not projections:
            return None
        return sum(projections) / len(projections) - self.offset


def model_folder(root: Path, model_id: str) -> Path:
    """`<root>/<model id>` (an id like owner/name becomes two folders, as in seed 000's layout)."""
    return Path(root) / model_id


def save_axis(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    required = {"monitor_direction", "monitor_center"}
    missing = required - tensors.keys()
    if missing:
        raise PersonaDataError(f"axis data lacks {sorted(missing)}")
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()}, folder / TENSORS)
    (folder / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def load_axis(folder: Path, hidden_size: int, n_layers: int) -> AssistantAxis:
    """Load and validate axis data for a model of this shape; PersonaDataError says what is wrong."""
    tensors_path, meta_path = folder / TENSORS, folder / META
    if not tensors_path.is_file() or not meta_path.is_file():
        raise PersonaDataError(f"no assistant-axis data in {folder}")
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(tensors_path))
    direction, center = tensors.get("monitor_direction"), tensors.get("monitor_center")
    layer = int(meta.get("axis_layer", -1))
    if direction is None or center is None:
        raise PersonaDataError(f"{tensors_path} lacks monitor_direction / monitor_center")
    if direction.shape != (hidden_size,) or center.shape != (hidden_size,):
        raise PersonaDataError(f"axis data has hidden size {direction.shape[0]}, the model has {hidden_size}")
    if not 0 <= layer < n_layers:
        raise PersonaDataError(f"axis_layer {layer} is outside the model's layers 0..{n_layers - 1}")
    if not (torch.isfinite(direction).all() and torch.isfinite(center).all()):
        raise PersonaDataError("axis data contains non-finite values")
    direction = direction / direction.norm()
    return AssistantAxis(
        model_id=meta.get("model_id", ""),
        layer=layer,
        direction=direction,
        center=center,
        title=meta.get("pc_title", PC_TITLE),
        meta=meta,
    )
