"""bitsandbytes 8-bit and 4-bit loads of the embedded model on the CPU: hooks see the same residual
stream, so steering and capture behave exactly as on the full-precision model."""

from __future__ import annotations

import pytest
import torch

from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.model_loader import load_model
from infrastructure.steering.hooks import our_hooks
from infrastructure.steering.spec import Capture, SteeringSpec, add_op
from tests.helpers import chat_ids

pytestmark = pytest.mark.slow  # loads the model twice more, quantized

LAYER = 12


@pytest.fixture(scope="module", params=["bnb-8bit", "bnb-4bit"])
def quantized(request):
    loaded = load_model(Settings(_env_file=None, quantization=request.param))
    eng = PersonaEngine(loaded, max_batch_size=4)
    eng.start()
    assert eng.wait_ready(300), eng.broken
    yield request.param, loaded, eng
    eng.stop()


async def test_quantized_model_steers_and_captures_like_full_precision(quantized):
    name, loaded, eng = quantized
    linear_types = {type(m).__name__ for m in loaded.model.modules()}
    assert ("Linear8bitLt" if name == "bnb-8bit" else "Linear4bit") in linear_types
    assert loaded.quantization == name

    ids = chat_ids(loaded.tokenizer, "What is the capital of France?")
    v = torch.randn(576, generator=torch.Generator().manual_seed(5))
    u = v / v.norm()
    greedy = SamplingParams(max_new_tokens=12)
    capture = (Capture("p", LAYER, u),)
    plain, zero, steered = await eng.collect(
        GenerationJob(
            [
                RowRequest(ids, greedy, None, capture),
                RowRequest(ids, greedy, SteeringSpec((add_op(LAYER, v, 0.0),)), capture),
                RowRequest(ids, greedy, SteeringSpec((add_op(LAYER, v, 30.0),)), capture),
            ]
        )
    )
    assert "Paris" in plain.text
    assert zero.token_ids == plain.token_ids
    assert steered.token_ids != plain.token_ids
    # at the steered layer itself every prompt position moves by exactly c * (v . u) = 30 |v|
    n = len(ids)
    shift = torch.tensor(steered.captures["p"][:n]) - torch.tensor(plain.captures["p"][:n])
    assert torch.allclose(shift, torch.full((n,), 30.0 * float(v.norm())), rtol=1e-3, atol=1e-2)
    assert our_hooks(loaded.model) == []
