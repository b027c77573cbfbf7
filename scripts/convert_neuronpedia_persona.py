"""Convert Neuronpedia-style pickled assistant-axis files (contrast_vectors.pt, pca/roles_layerN-min.pt)
into safetensors + JSON under PERSONA_DATA_PATH/<model id>/.

The inputs are Python pickles: loading one runs whatever code its author put in it. This command
therefore refuses to run unless --trust-pickle is given, and the server itself never unpickles.

    pipenv run python -m scripts.convert_neuronpedia_persona --trust-pickle \\
        --model-id meta-llama/Llama-3.3-70B-Instruct --pca pca/roles_layer40-min.pt \\
        --contrast contrast_vectors.pt --n-layers 80
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from infrastructure.persona.axis_data import PC_TITLE, model_folder, save_axis
from infrastructure.persona.convert import converted, find_contrast, find_pca, layer_from

REFUSAL = (
    "refusing to unpickle: these .pt files are pickles and loading one executes code from the file. "
    "Re-run with --trust-pickle only for files from a source you trust."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pca", type=Path, required=True, help="e.g. pca/roles_layer40-min.pt")
    p.add_argument("--contrast", type=Path, default=None, help="contrast_vectors.pt (orients PC1, kept as 'axis')")
    p.add_argument("--model-id", required=True)
    p.add_argument("--layer", type=int, default=None, help="axis layer (default: from the file or its name)")
    p.add_argument("--n-layers", type=int, default=None, help="default: the contrast vectors' count")
    p.add_argument("--out-root", type=Path, default=Path("data/persona"))
    p.add_argument("--trust-pickle", action="store_true", help="I trust these files: allow unpickling them")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> Path:
    if not args.trust_pickle:
        raise SystemExit(REFUSAL)
    raw_pca = torch.load(args.pca, map_location="cpu", weights_only=False)  # trusted by explicit opt-in
    raw_contrast = torch.load(args.contrast, map_location="cpu", weights_only=False) if args.contrast else None
    pca = find_pca(raw_pca)
    contrast = find_contrast(raw_contrast) if raw_contrast is not None else None
    layer = args.layer if args.layer is not None else layer_from(str(args.pca), raw_pca)
    if layer is None:
        raise SystemExit("cannot tell the PCA's layer: pass --layer")
    n_layers = args.n_layers or (contrast.shape[0] if contrast is not None else None)
    if n_layers is None:
        raise SystemExit("cannot tell the model's layer count: pass --n-layers")
    tensors = converted(pca, contrast, layer)
    meta = {
        "model_id": args.model_id,
        "hidden_size": int(pca["mean"].shape[0]),
        "n_layers": int(n_layers),
        "axis_layer": int(layer),
        "pc_title": PC_TITLE,
        "source": f"converted from {args.pca.name}" + (f" and {args.contrast.name}" if args.contrast else ""),
        "n_roles": None,
        "n_questions": None,
        "center": "pca_mean",
        "oriented_with_contrast": contrast is not None,
    }
    folder = model_folder(args.out_root, args.model_id)
    save_axis(folder, tensors, meta)
    print(f"wrote {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    convert(parse_args(argv))


if __name__ == "__main__":
    main()
