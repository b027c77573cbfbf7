"""The persona-data pipeline end to end on a tiny slice (real model, a few tokens), and the pickle converter."""

from __future__ import annotations

import json

import pytest
import torch

from infrastructure.persona.axis_data import load_axis, model_folder
from scripts import build_assistant_axis, convert_neuronpedia_persona, evaluate_persona_data, extract_persona_vectors

TINY = ["--max-questions", "2", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def built(loaded_model, engine, tmp_path_factory):
    """Vectors for one trait, an axis and a report, all into a temporary folder."""
    out = tmp_path_factory.mktemp("persona")
    args = extract_persona_vectors.parse_args(["--traits", "sarcasm", "--pairs", "8", "--out-dir", str(out)])
    extract_persona_vectors.run(loaded_model, engine, args)
    generated = ["--method", "generation", "--max-pairs", "1", "--out-dir", str(out / "generation"), *TINY]
    extract_persona_vectors.run(
        loaded_model, engine, extract_persona_vectors.parse_args(["--traits", "sarcasm", *generated])
    )
    args = build_assistant_axis.parse_args(
        ["--max-roles", "3", "--questions-per-role", "1", "--out-root", str(out), *TINY]
    )
    build_assistant_axis.run(loaded_model, engine, args)
    args = evaluate_persona_data.parse_args(
        ["--traits", "sarcasm", "--vectors-dir", str(out), "--persona-root", str(out), "--docs-dir", str(out), *TINY]
    )
    evaluate_persona_data.run(loaded_model, engine, args)
    return out


@pytest.mark.parametrize(("folder", "method", "n"), [("", "contrastive_authored", 6), ("generation", None, 2)])
def test_vector_file_format(built, loaded_model, folder, method, n):
    doc = json.loads((built / folder / "sarcasm.json").read_text())
    assert doc["trait_name"] == "sarcasm" and doc["model_name"] == loaded_model.model_id
    assert sorted(map(int, doc["vectors"])) == list(range(loaded_model.n_layers))
    vectors = torch.tensor([doc["vectors"][str(k)] for k in range(loaded_model.n_layers)])
    assert vectors.shape == (loaded_model.n_layers, loaded_model.hidden_size) and torch.isfinite(vectors).all()
    meta = doc["metadata"]
    assert meta.get("method") == method
    assert meta["n_samples"] == {"positive": n, "negative": n, "questions": n}  # contrastive: 6 fit + 2 validate
    assert meta["judge_used"] is False and len(meta["prompts_sha256"]) == 64
    assert 0 <= meta["recommended_layer"] < loaded_model.n_layers and meta["recommended_scalar"] > 0
    assert meta["median_residual_norm"] > 0
    assert abs(meta["norms"]["5"] - float(vectors[5].norm())) < 1e-2


def test_axis_loads_and_points_to_the_assistant(built, loaded_model):
    folder = model_folder(built, loaded_model.model_id)
    axis = load_axis(folder, loaded_model.hidden_size, loaded_model.n_layers)
    assert axis.layer == loaded_model.n_layers // 2
    meta = json.loads((folder / "assistant_axis.json").read_text())
    assert meta["n_roles"] == 3 and meta["n_questions"] == 2 and meta["heldout_roles"]
    assert abs(float(axis.direction.norm()) - 1) < 1e-5


def test_report_written(built):
    report = (built / "persona_data_report.md").read_text()
    assert "| sarcasm |" in report and "AUC" in report
    assert (built / "persona_trait_steering.png").stat().st_size > 1000
    assert (built / "persona_axis_separation.png").is_file()


class FakePCA:
    """Stands in for a pickled sklearn PCA (module level, so pickle can find it)."""

    def __init__(self, hidden: int) -> None:
        self.components_ = torch.eye(2, hidden).numpy()
        self.mean_ = torch.full((hidden,), 0.5).numpy()
        self.explained_variance_ = torch.tensor([3.0, 1.0]).numpy()


def _fake_files(tmp_path, hidden=8, layers=6):
    (tmp_path / "pca").mkdir()
    torch.save({"pca": FakePCA(hidden), "roles": ["pirate"]}, tmp_path / "pca" / "roles_layer3-min.pt")
    contrast = torch.zeros(layers, hidden)
    contrast[3, 0] = -2.0  # PC1 must be flipped to point this way
    torch.save(contrast, tmp_path / "contrast_vectors.pt")
    return [
        "--pca",
        str(tmp_path / "pca" / "roles_layer3-min.pt"),
        "--contrast",
        str(tmp_path / "contrast_vectors.pt"),
        "--model-id",
        "org/fake",
        "--out-root",
        str(tmp_path / "out"),
    ]


def test_converter_refuses_without_trust(tmp_path):
    with pytest.raises(SystemExit, match="refusing to unpickle"):
        convert_neuronpedia_persona.main(_fake_files(tmp_path))
    assert not (tmp_path / "out").exists()


def test_converter_writes_the_safe_format(tmp_path):
    convert_neuronpedia_persona.main([*_fake_files(tmp_path), "--trust-pickle"])
    axis = load_axis(tmp_path / "out" / "org" / "fake", hidden_size=8, n_layers=6)
    assert axis.layer == 3 and axis.meta["source"].startswith("converted")
    assert float(axis.direction[0]) == -1.0  # oriented with the contrast vector
    assert torch.allclose(axis.center, torch.full((8,), 0.5))
