"""Per-token logprobs from the sampler: the distribution the token was drawn from, on tiny logits."""

from __future__ import annotations

import math

import torch

from infrastructure.engine.job import SamplingParams
from infrastructure.engine.sampling import RowSampler, sample

V = 6
LOGITS = torch.tensor([[0.5, 2.0, -1.0, 1.5, 0.0, 2.0 - 1e-3], [1.0, 0.0, 0.0, 3.0, 0.0, 0.0]])


def samplers(*params: SamplingParams) -> list[RowSampler]:
    return [RowSampler(p, V, torch.device("cpu")) for p in params]


def test_greedy_token_is_the_top_candidate_and_logprobs_are_log_softmax():
    rows = samplers(SamplingParams(4, n_logprobs=3), SamplingParams(4))
    tokens = sample(LOGITS.clone(), rows)
    lp = rows[0].last_logprob
    expected = LOGITS[0].log_softmax(-1)
    assert tokens[0] == 1 and lp.token_id == 1 and lp.top[0][0] == 1
    assert math.isclose(lp.logprob, expected[1].item(), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [1, 5, 3]
    assert all(a >= b for (_, a), (_, b) in zip(lp.top, lp.top[1:]))
    assert rows[1].last_logprob is None  # a row that did not ask gets nothing


def test_logprobs_include_frequency_penalty_and_temperature():
    params = SamplingParams(4, temperature=0.5, seed=1, frequency_penalty=1.0, n_logprobs=V)
    (row,) = samplers(params)
    row.observe(1)
    row.observe(1)  # token 1 penalised by 2.0
    token = sample(LOGITS[:1].clone(), [row])[0]
    penalised = LOGITS[0].clone()
    penalised[1] -= 2.0
    expected = (penalised / 0.5).log_softmax(-1)
    got = dict(row.last_logprob.top)
    assert all(math.isclose(got[t], expected[t].item(), rel_tol=1e-5) for t in range(V))
    assert math.isclose(row.last_logprob.logprob, expected[token].item(), rel_tol=1e-5)
