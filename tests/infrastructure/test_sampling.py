"""Token selection without a model: penalties, top-p, greedy rows, and seeded rows that draw the same
tokens whatever else is in the batch."""

from __future__ import annotations

import math

import pytest
import torch

from infrastructure.engine.job import SamplingParams
from infrastructure.engine.sampling import RowSampler, sample, top_p_filter

CPU = torch.device("cpu")


def sampler(**params) -> RowSampler:
    return RowSampler(SamplingParams(max_new_tokens=8, **params), vocab_size=5, device=CPU)


def test_penalties_subtract_count_times_frequency_plus_presence():
    s = sampler(frequency_penalty=0.5, presence_penalty=1.0)
    for token in (1, 1, 3, 99):  # 99 is outside the vocabulary: ignored
        s.observe(token)
    out = s.penalise(torch.zeros(5))
    assert out.tolist() == [0.0, -2.0, 0.0, -1.5, 0.0]


def test_without_penalties_logits_pass_unchanged():
    s = sampler()
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    s.observe(2)
    assert s.counts is None and s.penalise(logits) is logits


@pytest.mark.parametrize(("top_p", "kept"), [(1.0, 3), (0.85, 3), (0.7, 2), (0.6, 2), (0.45, 1), (0.01, 1)])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, kept):
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    out = top_p_filter(logits, torch.tensor([top_p]))
    finite = torch.isfinite(out[0])
    assert int(finite.sum()) == kept
    assert finite[1]  # the most likely token always stays
    assert torch.equal(out[0][finite], logits[0][finite])  # kept logits are untouched, in their places


def test_greedy_rows_take_the_argmax_and_penalties_can_move_it():
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 1.0]])
    greedy, penalised = sampler(), sampler(presence_penalty=1.0)
    penalised.observe(1)
    assert sample(logits, [greedy, sampler()]) == [1, 0]
    assert sample(logits, [penalised, sampler()]) == [2, 0]


def test_a_seeded_row_draws_the_same_tokens_alone_or_batched():
    logits = torch.zeros(1, 5)

    def draws(batched: bool) -> list[int]:
        row = sampler(temperature=1.0, seed=7)
        others = [sampler(temperature=1.0, seed=123), sampler()] if batched else []
        batch = logits.expand(1 + len(others), 5)
        return [sample(batch, [row, *others])[0] for _ in range(20)]

    alone = draws(False)
    assert alone == draws(True)
    assert len(set(alone)) > 1  # uniform logits: the draws vary, so equality is not trivial


def test_temperature_sharpens_towards_the_argmax():
    logits = torch.tensor([[0.0, math.log(4.0), 0.0, 0.0, 0.0]])  # p = 0.5 for token 1 at temperature 1
    cold = sampler(temperature=0.05, seed=1)
    assert {sample(logits, [cold])[0] for _ in range(50)} == {1}
