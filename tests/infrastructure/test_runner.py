"""ModelRunner on the real embedded model (CPU, fp32): a ragged step over the paged pool gives the same
logits as plain forwards, whatever the chunking, the block order or the attention kernel; steering
tables are expanded per token; the block tables on the device follow the rows' tables."""

from __future__ import annotations

import pytest
import torch

from infrastructure.engine.runner import ModelRunner, Work, decode_layout
from infrastructure.steering.hooks import build_tables, our_hooks
from infrastructure.steering.spec import SteeringSpec, add_op


@pytest.fixture(scope="module")
def prompts(loaded_model):
    tok = loaded_model.tokenizer
    return tok("The capital of France is")["input_ids"], tok("Once upon a time, in a land far away, a")["input_ids"]


def reference(model, ids: list[int], steering=None) -> torch.Tensor:
    from infrastructure.engine.batch import run_forward
    from infrastructure.steering.hooks import BatchSteering

    tables = build_tables([steering], [()], model.config.hidden_size, lambda s: torch.device("cpu"), torch.float32)
    state = BatchSteering(tables=tables)
    x = torch.tensor([ids])
    if state.steers:
        state.set_mask(torch.ones_like(x, dtype=torch.bool))
    return run_forward(model, state, x, torch.ones_like(x), torch.arange(len(ids)).unsqueeze(0), None)[0]


@pytest.mark.parametrize("kernel", ["rows", "grouped"])
def test_ragged_chunked_steps_equal_plain_forwards(loaded_model, prompts, kernel):
    model = loaded_model.model
    a, b = prompts
    with torch.inference_mode():
        runner = ModelRunner(model, 32, 4, torch.float32, kernel, max_rows=2, max_blocks=16)
        ta, tb = [7, 1, 3, 0], [4, 5, 9, 2, 8, 6]  # blocks in no particular order
        logits, _ = runner.execute(
            [Work(a, 0, ta, [False] * len(a), True, 0), Work(b[:5], 0, tb, [False] * 5, False, 1)], {}
        )
        assert torch.allclose(logits[0], reference(model, a), atol=1e-4)
        logits, _ = runner.execute([Work(b[5:], 5, tb, [False] * (len(b) - 5), True, 1)], {})  # a later chunk
        assert torch.allclose(logits[0], reference(model, b), atol=1e-4)
        na, nb = int(logits[0].argmax()), 11
        step = [Work([na], len(a), ta, [False], True, 0), Work([nb], len(b), tb, [False], True, 1)]
        logits, _ = runner.execute(step, {})  # both rows decode in one step
    assert torch.allclose(logits[0], reference(model, [*a, na]), atol=1e-4)
    assert torch.allclose(logits[1], reference(model, [*b, nb]), atol=1e-4)
    assert runner.tables[0, :4].tolist() == ta and runner.tables[1, :6].tolist() == tb
    assert our_hooks(model) == []


def test_steering_applies_per_token_to_its_own_row_only(loaded_model, prompts):
    model = loaded_model.model
    a, b = prompts
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    spec = SteeringSpec((add_op(10, vector / vector.norm() * 20, 1.0),))
    tables = build_tables(
        [spec, None], [(), ()], model.config.hidden_size, lambda s: torch.device("cpu"), torch.float32
    )
    with torch.inference_mode():
        runner = ModelRunner(model, 32, 4, torch.float32, "rows", max_rows=2, max_blocks=16)
        works = [Work(a, 0, [0, 1, 2], [True] * len(a), True, 0), Work(b, 0, [3, 4, 5, 6], [False] * len(b), True, 1)]
        logits, _ = runner.execute(works, tables)
    assert torch.allclose(logits[0], reference(model, a, spec), atol=1e-4)
    assert torch.allclose(logits[1], reference(model, b), atol=1e-4)
    assert not torch.allclose(logits[0], reference(model, a), atol=1e-2)


def test_decode_layout_pads_with_the_scratch_slot_and_masks_other_rows():
    tables = torch.tensor([[2, 0], [1, 3], [9, 9]])
    kv, mask = decode_layout(tables, 4, torch.tensor([0, 1]), torch.tensor([5, 2]), 8, scratch=36)
    assert kv.tolist() == [8, 9, 10, 11, 0, 4, 5, 36]
    assert mask[0, 0].tolist() == [[True] * 5 + [False] * 3, [False] * 5 + [True, True, False]]
