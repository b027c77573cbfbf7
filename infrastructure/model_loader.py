"""Load the configured model and tokenizer: embedded default, local folder, GGUF file or cached HF id."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from infrastructure.embedded import EMBEDDED_MODEL_ID, ensure_embedded
from infrastructure.errors import ModelLoadError
from infrastructure.prequantised import PREQUANTISED, prequantised_dtype, prequantised_kwargs, resolve_kernel
from infrastructure.quant_tiles import register_awq_tiles

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadConfig(Protocol):
    """What loading a model needs to know, and nothing else (read-only). The app's `Settings` provides
    it, as do the scripts and tests that build one; this layer never imports the app."""

    @property
    def weights_source(self) -> str | None: ...  # None: the embedded model

    @property
    def model_cache_dir(self) -> Path: ...

    @property
    def device(self) -> str: ...  # auto | cuda | cpu

    @property
    def model_dtype(self) -> str: ...  # auto | float32 | bfloat16 | float16

    @property
    def quantization(self) -> str: ...  # none | bnb-8bit | bnb-4bit

    @property
    def gpu_memory_utilization(self) -> float: ...

    @property
    def tensor_parallel_size(self) -> int: ...  # > 1: one process per GPU, each a shard of every layer

    @property
    def layer_split_size(self) -> int: ...  # > 1: the layers spread over that many GPUs (accelerate)

    def logical_model_id(self, loaded_id: str) -> str: ...  # the id users see and persona data is filed under


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    weights_id: str  # what was loaded (OVERRIDE_MODEL_ID / MODEL_NAME / embedded)
    model_id: str  # logical id: persona data lookup, /v1/models
    source: str  # embedded | local | gguf | cache
    device: torch.device  # where inputs go (the embeddings' device)
    devices: list[str]
    dtype: torch.dtype
    quantization: str
    load_seconds: float
    quant_kernel: str = ""  # AWQ / GPTQ: the 4-bit kernel in use (QUANT_KERNEL resolved), e.g. gemlite

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)


def resolve_device(setting: str) -> str:
    """`auto` picks CUDA when visible; asking for CUDA without one is a start-up error."""
    if setting == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if setting == "cuda":
        raise ModelLoadError("DEVICE=cuda but no CUDA device is visible (use DEVICE=cpu or auto)")
    return "cpu"


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return _DTYPES[setting]


def _locate(settings: LoadConfig) -> tuple[str, str, dict]:
    """(weights id, source kind, from_pretrained path + kwargs) for the configured weights."""
    source = settings.weights_source
    if source is None:
        folder = ensure_embedded(settings.model_cache_dir)
        return EMBEDDED_MODEL_ID, "embedded", {"pretrained_model_name_or_path": str(folder)}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {source} does not exist")
        return source, "gguf", {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is a folder without config.json: not a transformers checkpoint")
        return source, "local", {"pretrained_model_name_or_path": str(path)}
    if source.count("/") != 1 or source.startswith(("/", ".")):
        raise ModelLoadError(f"{source} is neither an existing folder, a .gguf file nor a hub id (owner/name)")
    kwargs = {"pretrained_model_name_or_path": source, "cache_dir": str(settings.model_cache_dir)}
    return source, "cache", kwargs | {"local_files_only": True}


def _placement(settings: LoadConfig, device: str) -> dict:
    """device_map / max_memory for the chosen device; LAYER_SPLIT_SIZE GPUs share the layers (one works at a
    time: a memory split, not a speed-up; TENSOR_PARALLEL_SIZE shards every layer instead, `tensor_parallel.py`)."""
    if device == "cpu":
        return {"device_map": {"": "cpu"}}
    visible, split = torch.cuda.device_count(), settings.layer_split_size
    if split > visible:
        raise ModelLoadError(f"LAYER_SPLIT_SIZE={split} but only {visible} GPU(s) are visible")
    budget = {
        i: int(torch.cuda.get_device_properties(i).total_memory * settings.gpu_memory_utilization) for i in range(split)
    }
    # several GPUs: spread the layers evenly (each GPU then holds about 1/N of the model and its KV cache)
    return {"device_map": "balanced" if len(budget) > 1 else "auto", "max_memory": budget}


QUANTISED_HINT = (
    "AWQ and GPTQ checkpoints load through gptqmodel (and GPTQ also through optimum), both in Pipfile.lock: "
    "install the locked packages (pipenv install), or serve the unquantised checkpoint with QUANTIZATION=bnb-4bit"
)


def _quantization(settings: LoadConfig, kwargs: dict, dtype: torch.dtype) -> tuple[str, dict]:
    """bitsandbytes on request; pre-quantised checkpoints announce themselves in their config."""
    from transformers import AutoConfig, BitsAndBytesConfig

    if "gguf_file" in kwargs:
        config_q = None
    else:
        config = AutoConfig.from_pretrained(**kwargs)
        config_q = getattr(config, "quantization_config", None)
    method = None
    if config_q is not None:
        method = config_q.get("quant_method") if isinstance(config_q, dict) else config_q.quant_method
    if method is not None and str(method) != "gguf":  # GGUF weights are dequantised on load: not quantised
        if settings.quantization != "none":
            raise ModelLoadError(f"QUANTIZATION={settings.quantization} but the checkpoint is already {method}")
        if str(method) in PREQUANTISED:  # AWQ / GPTQ: the kernel and dtype chosen in infrastructure.prequantised
            device = resolve_device(settings.device)
            kernel = getattr(settings, "quant_kernel", "auto")
            try:
                kernel = resolve_kernel(str(method), config_q, device, kernel)
                qkwargs = prequantised_kwargs(str(method), config_q, device, kernel)
            except ValueError as exc:
                raise ModelLoadError(str(exc)) from exc
            qkwargs |= {"dtype": prequantised_dtype(str(method), device, dtype), "kernel": kernel}
            return str(method), qkwargs | {"config_q": config_q}
        return str(method), {}
    if settings.quantization == "bnb-8bit":
        return "bnb-8bit", {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    if settings.quantization == "bnb-4bit":
        # 4-bit weights are dequantised to the model's dtype for each matmul (bf16 on a GPU, fp32 on the CPU)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return "bnb-4bit", {"quantization_config": q}
    return "none", {}


def _repack(model: nn.Module, method: str, config_q, device: str, cache_dir: Path, kernel: str) -> None:
    """Repack the loaded 4-bit modules for GemLite (`infrastructure/quant_gemlite.py`) or Marlin
    (`infrastructure/quant_marlin.py`); on the CPU their dequantised stand-in. On a GPU, GemLite's kernel configs
    are settled (`infrastructure/gemlite_configs.py`)."""
    from infrastructure.quant_gemlite import (
        DequantisedLinear,
        UnsupportedLayout,
        convert_model,
        gemlite_class,
        layout_of,
    )

    try:
        if device != "cuda":
            cls = DequantisedLinear
        elif kernel == "marlin":
            from infrastructure.quant_marlin import MarlinLinear, build_marlin

            build_marlin()  # from gptqmodel's cache, or compiled now (minutes, logged by the library)
            cls = MarlinLinear
        else:
            cls = gemlite_class()
        convert_model(model, layout_of(method, config_q), cls)
    except (UnsupportedLayout, RuntimeError) as exc:
        raise ModelLoadError(f"QUANT_KERNEL={kernel}: {exc}") from exc
    if device == "cuda" and kernel == "gemlite":
        from infrastructure.gemlite_configs import settle

        settle(model, cache_dir)


def load_model(settings: LoadConfig, placement: dict | None = None) -> LoadedModel:
    """Load weights and tokenizer as configured; every failure is a ModelLoadError with a remedy. `placement`
    (from_pretrained's device_map) overrides the settings' (a tensor-parallel rank loads onto one device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    device = resolve_device(settings.device)
    if device == "cuda":
        # cuDNN's attention plans per key length: a dynamic cache (one new length every step) and every new prompt
        # length paid a plan build (~2 ms per layer on an H200); flash / memory-efficient kernels need none
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = resolve_dtype(settings.model_dtype, device)
    weights_id, source, kwargs = _locate(settings)
    try:
        quantization, qkwargs = _quantization(settings, kwargs, dtype)
        dtype = qkwargs.pop("dtype", dtype)
        kernel, config_q = qkwargs.pop("kernel", ""), qkwargs.pop("config_q", None)
        tokenizer = AutoTokenizer.from_pretrained(**kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            **kwargs, dtype=dtype, **(placement or _placement(settings, device)), **qkwargs
        )
    except OSError as exc:
        hint = f"; fetch it first: pipenv run python -m scripts.download_models {weights_id}"
        raise ModelLoadError(f"cannot load {weights_id}: {exc}{hint if source == 'cache' else ''}") from exc
    except ImportError as exc:  # a pre-quantised checkpoint whose kernels' library is not installed
        raise ModelLoadError(f"cannot load {weights_id}: {exc}. {QUANTISED_HINT}") from exc
    model.eval()
    model.requires_grad_(False)
    if kernel in ("gemlite", "marlin"):  # repacked for GemLite's or Marlin's kernels, before any warm-up
        _repack(model, quantization, config_q, device, settings.model_cache_dir, kernel)
    elif quantization == "awq":  # this GPU's measured Triton tile plans, before the engine warms its kernels
        register_awq_tiles(model, model.get_input_embeddings().weight.device)
    devices = sorted({str(p.device) for p in model.parameters()})
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        weights_id=weights_id,
        model_id=settings.logical_model_id(weights_id),
        source=source,
        device=model.get_input_embeddings().weight.device,
        devices=devices,
        dtype=dtype,
        quantization=quantization,
        load_seconds=time.perf_counter() - started,
        quant_kernel=kernel,
    )
    log.info("loaded %s (%s) on %s in %.1fs", weights_id, source, devices, loaded.load_seconds)
    return loaded
