"""Tiny AWQ and GPTQ checkpoints (scripts/make_quantized_checkpoint) load through the server's loader, run on
gptqmodel's 4-bit modules, steer and capture, and compute what the same weights dequantised into a plain
model compute: logits within 1% of their largest magnitude (torch's CPU int4 kernel, which gptqmodel picks,
multiplies in bfloat16 inside a float32 model) and token-equal greedy continuations, plain and steered. The
`:gemlite` variants load with QUANT_KERNEL=gemlite: repacked for GemLite (infrastructure/quant_gemlite.py; on the
CPU its dequantising stand-in), q/k/v and gate/up merged, layers fused; their logits match to float32 rounding."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.errors import ModelLoadError
from infrastructure.model_loader import LoadedModel, load_model
from infrastructure.prequantised import prequantised_dtype, prequantised_kwargs
from infrastructure.steering.spec import Capture, SteeringSpec, add_op
from scripts.make_quantized_checkpoint import build
from scripts.quantized_layout import dequantised_state_dict

pytest.importorskip("gptqmodel", reason="AWQ/GPTQ kernels: gptqmodel comes with the locked packages")

LAYER = 0  # of the two: the steered residual then passes through one more quantised layer
LOGIT_TOLERANCE = 0.01  # of the reference logits' largest magnitude


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    from infrastructure.embedded import ensure_embedded

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded(Settings(_env_file=None).model_cache_dir))
    root = tmp_path_factory.mktemp("prequantised")
    return {
        fmt: build(fmt, "tiny-llama", root / fmt, tokenizer=tokenizer) | {"dir": root / fmt} for fmt in ("awq", "gptq")
    }


def _plain_twin(loaded: LoadedModel, folder) -> LoadedModel:
    """The same model unquantised: the checkpoint's config without quantization, its dequantised weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(dequantised_state_dict(folder), strict=True)
    model.eval().requires_grad_(False)
    return replace(loaded, model=model, quantization="none")


def _engine(loaded: LoadedModel) -> PersonaEngine:
    eng = PersonaEngine(loaded, max_batch_size=4)
    eng.start()
    assert eng.wait_ready(120), eng.broken
    return eng


@pytest.fixture(scope="module", params=["awq", "gptq", "awq:gemlite", "gptq:gemlite"])
def pair(request, tiny_checkpoints):
    fmt, _, kernel = request.param.partition(":")
    folder = tiny_checkpoints[fmt]["dir"]
    quant = load_model(Settings(_env_file=None, model_name=str(folder), device="cpu", quant_kernel=kernel or "auto"))
    plain = _plain_twin(quant, folder)
    engines = _engine(quant), _engine(plain)
    yield request.param, quant, plain, engines
    for eng in engines:
        eng.stop()


def test_loads_on_gptqmodel_modules_and_matches_the_dequantised_model(pair):
    param, quant, plain, _ = pair
    fmt, _, kernel = param.partition(":")
    assert quant.quantization == fmt and quant.dtype == torch.float32 and quant.source == "local"
    attn = quant.model.model.layers[0].self_attn
    if kernel == "gemlite":  # merged q/k/v on the repacked layout, the fused layer forward
        from infrastructure.engine.fusion import FUSED_MARK
        from infrastructure.quant_gemlite import DequantisedLinear

        assert quant.quant_kernel == "gemlite" and not hasattr(attn, "q_proj")
        assert isinstance(attn.qkv_proj, DequantisedLinear) and attn.qkv_proj.out_features == 512
        assert getattr(quant.model.model.layers[1], FUSED_MARK) is not None
    else:
        assert type(attn.q_proj).__module__.startswith("gptqmodel.") and not isinstance(attn.q_proj, torch.nn.Linear)
    assert isinstance(quant.model.lm_head, torch.nn.Linear)  # never quantised
    ids = torch.tensor([[1, 520, 3300, 1200, 77, 9000, 431, 12, 4000, 2]])
    with torch.no_grad():
        a, b = quant.model(ids).logits, plain.model(ids).logits
    assert b.abs().max() > 0.5  # a real signal, not all zeros
    tolerance = 1e-5 if kernel == "gemlite" else LOGIT_TOLERANCE  # the same float32 weights, another order
    assert (a - b).abs().max() < tolerance * b.abs().max()


async def test_steers_and_captures_like_the_dequantised_model(pair):
    fmt, quant, plain, (q_engine, p_engine) = pair
    ids = tuple(quant.tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"])
    v = torch.randn(quant.hidden_size, generator=torch.Generator().manual_seed(5))
    u = v / v.norm()
    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    capture = (Capture("p", LAYER, u),)

    def rows():
        return [
            RowRequest(ids, greedy, None, capture),
            RowRequest(ids, greedy, SteeringSpec((add_op(LAYER, v, 0.0),)), capture),
            RowRequest(ids, greedy, SteeringSpec((add_op(LAYER, v, 40.0),)), capture),
        ]

    q_plain, q_zero, q_steered = await q_engine.collect(GenerationJob(rows()))
    p_plain, p_zero, p_steered = await p_engine.collect(GenerationJob(rows()))
    assert q_zero.token_ids == q_plain.token_ids
    assert q_steered.token_ids != q_plain.token_ids
    assert (q_plain.token_ids, q_steered.token_ids) == (p_plain.token_ids, p_steered.token_ids)
    n = len(ids)  # at the steered layer every prompt position moves by exactly c * (v . u) = 40 |v|
    shift = torch.tensor(q_steered.captures["p"][:n]) - torch.tensor(q_plain.captures["p"][:n])
    assert torch.allclose(shift, torch.full((n,), 40.0 * float(v.norm())), rtol=1e-3, atol=1e-2)
    assert torch.allclose(torch.tensor(q_steered.captures["p"]), torch.tensor(p_steered.captures["p"]), atol=1e-2)


def test_kernel_and_dtype_choice():
    """On a GPU the Triton kernels in float16; on the CPU the library's pick in the requested dtype."""
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    assert prequantised_kwargs("awq", awq, "cuda")["quantization_config"].backend == "gemm_triton"
    assert prequantised_kwargs("gptq", gptq, "cuda")["quantization_config"].backend == "triton"
    assert prequantised_kwargs("awq", awq, "cpu")["quantization_config"].backend == "auto"
    assert prequantised_kwargs("awq", awq, "cpu", "torch")["quantization_config"].backend == "torch_awq"
    assert prequantised_dtype("awq", "cuda", torch.bfloat16) == torch.float16
    assert prequantised_dtype("gptq", "cpu", torch.float32) == torch.float32


def test_missing_kernel_library_and_double_quantisation_are_clear_load_errors(tiny_checkpoints, monkeypatch):
    """Without gptqmodel the load fails with a ModelLoadError naming it and the bnb-4bit route; bitsandbytes on
    top of a pre-quantised checkpoint is refused."""
    import transformers.quantizers.quantizer_awq as quantizer_awq

    folder = str(tiny_checkpoints["awq"]["dir"])
    with pytest.raises(ModelLoadError, match="already"):
        load_model(Settings(_env_file=None, model_name=folder, device="cpu", quantization="bnb-4bit"))
    monkeypatch.setattr(quantizer_awq, "is_gptqmodel_available", lambda: False)
    with pytest.raises(ModelLoadError) as caught:
        load_model(Settings(_env_file=None, model_name=folder, device="cpu"))
    assert "gptqmodel" in str(caught.value) and "QUANTIZATION=bnb-4bit" in str(caught.value)


def test_awq_gemv_checkpoint_repacks_for_gemlite_exactly(tmp_path, monkeypatch, tiny_checkpoints):
    """AutoAWQ's "gemv" layout loads onto gptqmodel's GEMV module (CUDA-only in gptqmodel because its kernel is:
    allowed on the CPU here, where it never runs) and is repacked before any forward: the same logits as the
    checkpoint dequantised into a plain model."""
    from gptqmodel.models._const import DEVICE
    from gptqmodel.nn_modules.qlinear.gemv_awq import AwqGEMVLinear
    from transformers import AutoTokenizer

    from infrastructure.quant_gemlite import DequantisedLinear

    monkeypatch.setattr(AwqGEMVLinear, "SUPPORTS_DEVICES", [DEVICE.ALL])
    folder = tmp_path / "gemv"
    build("awq-gemv", "tiny-llama", folder, tokenizer=AutoTokenizer.from_pretrained(tiny_checkpoints["awq"]["dir"]))
    quant = load_model(Settings(_env_file=None, model_name=str(folder), device="cpu", quant_kernel="gemlite"))
    assert quant.quant_kernel == "gemlite"
    assert isinstance(quant.model.model.layers[0].mlp.gate_up_proj, DequantisedLinear)
    plain = _plain_twin(quant, folder)
    ids = torch.tensor([[1, 520, 3300, 1200, 77, 9000, 431, 12, 4000, 2]])
    with torch.no_grad():
        a, b = quant.model(ids).logits, plain.model(ids).logits
    assert b.abs().max() > 0.5 and (a - b).abs().max() < 1e-5 * b.abs().max()


def test_no_gptq_module_outlives_the_repacking(tiny_checkpoints):
    """gptqmodel's GPTQ modules sit in reference cycles: the repacking collects them (with the collector off here,
    as it may be at any moment), so the originals' memory is free before the KV pool is sized."""
    import gc

    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    folder = tiny_checkpoints["gptq"]["dir"]
    gc.disable()
    try:
        loaded = load_model(Settings(_env_file=None, model_name=str(folder), device="cpu", quant_kernel="gemlite"))
        alive = [o for o in gc.get_objects() if isinstance(o, BaseQuantLinear)]
    finally:
        gc.enable()
    assert loaded.quant_kernel == "gemlite" and not alive
