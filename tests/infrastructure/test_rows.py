"""A row's bookkeeping without a model: capture slots, where its steering applies, and how it ends
(end-of-sequence, a stop string, or its token budget)."""

from __future__ import annotations

import torch

from infrastructure.engine.detok import Detokenizer
from infrastructure.engine.job import GenerationJob, RowRequest, RowToken, SamplingParams
from infrastructure.engine.rows import Row, capture_slots
from infrastructure.engine.sampling import RowSampler
from infrastructure.steering.spec import Capture, Positions, SteeringSpec, add_op
from tests.infrastructure.test_detok import EOS, ByteTokenizer

SPECIAL = frozenset({EOS})


def make_row(steering: SteeringSpec | None = None, mask=None, max_new: int = 8, **sampling) -> Row:
    request = RowRequest((1, 2, 3), SamplingParams(max_new_tokens=max_new, **sampling), steering, (), mask)
    return Row(
        job=GenerationJob([request]),
        index=0,
        request=request,
        sampler=RowSampler(request.sampling, vocab_size=257, device=torch.device("cpu")),
        detok=Detokenizer(ByteTokenizer()),
        max_new=max_new,
        eos_ids=SPECIAL,
    )


def spec(**kwargs) -> SteeringSpec:
    return SteeringSpec((add_op(3, torch.ones(4), 1.0),), **kwargs)


def test_capture_slots_number_captures_per_site():
    d = torch.ones(4)
    request = RowRequest(
        (1,), SamplingParams(max_new_tokens=1), captures=(Capture("a", 5, d), Capture("b", 7, d), Capture("c", 5, d))
    )
    assert capture_slots(request) == [("a", 5, 0), ("b", 7, 0), ("c", 5, 1)]


def test_unsteered_row_steers_nowhere():
    row = make_row()
    assert row.steer_mask([1, 2, EOS], prompt=True, special_ids=SPECIAL) == [False, False, False]


def test_positions_choose_prompt_or_response():
    ids = [1, 2]
    for positions, in_prompt, in_response in [
        (Positions.ALL, True, True),
        (Positions.PROMPT, True, False),
        (Positions.RESPONSE, False, True),
    ]:
        row = make_row(spec(positions=positions))
        assert row.steer_mask(ids, prompt=True, special_ids=SPECIAL) == [in_prompt] * 2
        assert row.steer_mask(ids, prompt=False, special_ids=SPECIAL) == [in_response] * 2


def test_prompt_mask_and_special_tokens_narrow_the_steered_positions():
    row = make_row(spec(steer_special_tokens=False), mask=(True, False, True))
    assert row.steer_mask([1, 2, EOS], prompt=True, special_ids=SPECIAL) == [True, False, False]
    assert row.steer_mask([4, EOS], prompt=False, special_ids=SPECIAL) == [True, False]  # the mask is the prompt's


def test_end_of_sequence_finishes_with_stop_and_no_text():
    row = make_row()
    events = [row.accept(t) for t in b"Hi"] + [row.accept(EOS)]
    assert [e.delta for e in events[:2]] == ["H", "i"] and events[2] is None
    assert isinstance(events[0], RowToken) and events[1].text == "Hi"
    done = row.finished_event()
    assert (done.text, done.finish_reason, done.token_ids, done.prompt_tokens) == ("Hi", "stop", [72, 105, EOS], 3)


def test_ignore_eos_keeps_generating():
    row = make_row(ignore_eos=True, max_new=3)
    for t in (72, EOS, 105):
        row.accept(t)
    assert row.finish_reason == "length" and row.finished_event().text == "Hi"


def test_stop_string_cuts_the_text_before_it():
    row = make_row(stop=("lo",), max_new=20)
    for t in b"Hello":
        row.accept(t)
        if row.finish_reason:
            break
    done = row.finished_event()
    assert (done.text, done.finish_reason) == ("Hel", "stop")


def test_token_budget_finishes_with_length():
    row = make_row(max_new=3)
    reasons = []
    for t in b"abcd":
        row.accept(t)
        reasons.append(row.finish_reason)
    assert reasons[:3] == [None, None, "length"]
    assert row.finished_event().finish_reason == "length"


def test_captures_accumulate_per_name():
    row = make_row()
    row.record({"axis": [0.5, 1.0]})
    row.record({"axis": [2.0], "other": [3.0]})
    assert row.finished_event().captures == {"axis": [0.5, 1.0, 2.0], "other": [3.0]}
