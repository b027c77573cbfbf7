"""Per-row token selection: OpenAI-style penalties, temperature, top-p, and a seeded generator per row."""

from __future__ import annotations

import math
import random

import torch

from infrastructure.engine.grammar import Constraint, constrain
from infrastructure.engine.job import SamplingParams, TokenLogprob


class RowSampler:
    """Sampling state of one row: its own generator (same seed => same tokens, whatever the batch),
    token counts for frequency / presence penalties, and its grammar's matcher (structured output)."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device, tokenizer=None) -> None:
        self.params = params
        self.constraint = Constraint(params.grammar, tokenizer) if params.grammar is not None else None
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        self.last_logprob: TokenLogprob | None = None  # set by `sample` for rows with n_logprobs > 0
        self.counts: torch.Tensor | None = None
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def observe(self, token_id: int) -> None:
        if self.constraint is not None:
            self.constraint.consume(token_id)
        if self.counts is not None and token_id < self.counts.shape[0]:
            self.counts[token_id] += 1

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)."""
        if self.counts is None:
            return logits
        counts = self.counts[: logits.shape[-1]]
        p = self.params
        return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the smallest set of tokens whose probability mass reaches top_p [R]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p.unsqueeze(-1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows whose logits cannot be sampled from (a NaN or +inf anywhere, or every logit -inf),
    e.g. after a steering vector overflowed the row's residual stream."""
    return (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1) | torch.isneginf(logits).all(dim=-1)


def plain_greedy(samplers: list[RowSampler]) -> bool:
    """Every row takes its argmax as is: no temperature, penalties, grammar or logprobs."""
    return all(
        s.generator is None and s.counts is None and s.constraint is None and s.params.n_logprobs == 0 for s in samplers
    )


def plan_greedy(logits: torch.Tensor | None, samplers: list[RowSampler]) -> torch.Tensor | None:
    """For rows that all decode greedily (`plain_greedy`): their tokens and unusable flags [2, B], queued right
    behind the step's forward while the GPU still runs it. Collecting the step is then one transfer instead of
    ~10 more kernel launches after the step ends, each of which gives the GIL away (to the event loop, busy
    streaming the last step's tokens) on the path between two decode steps. None: `sample` does it all."""
    if logits is None or not samplers or not plain_greedy(samplers):
        return None
    return torch.stack([logits.argmax(dim=-1), unusable_rows(logits).to(torch.long)])


def sample(logits: torch.Tensor, samplers: list[RowSampler], planned: torch.Tensor | None = None) -> list[int | None]:
    """Choose the next token of every row from float32 logits [B,V]. A row whose logits or probabilities
    are not finite gets None instead of a token: only that row fails, its neighbours in the batch go on.
    `planned`: `plan_greedy`'s tokens and flags for these logits and samplers (all greedy)."""
    if planned is not None:
        picked, failed = planned.tolist()
        return [None if b else t for t, b in zip(picked, failed)]
    logits = (
        torch.stack([s.penalise(row) for s, row in zip(samplers, logits)])
        if any(s.counts is not None for s in samplers)
        else logits
    )
    if any(s.constraint is not None for s in samplers):  # structured output: forbidden tokens -> -inf
        logits = constrain(logits, [s.constraint for s in samplers])
    broken = unusable_rows(logits)
    chosen = logits.argmax(dim=-1)
    hot = [i for i, s in enumerate(samplers) if s.generator is not None]
    if hot:
        idx = torch.tensor(hot, device=logits.device)
        temps = torch.tensor([samplers[i].params.temperature for i in hot], device=logits.device)
        top_p = torch.tensor([samplers[i].params.top_p for i in hot], device=logits.device)
        scaled = top_p_filter(logits[idx] / temps.unsqueeze(-1), top_p)
        probs = scaled.softmax(dim=-1)
        broken[idx] |= ~torch.isfinite(probs).all(dim=-1)
        bad = broken.tolist()
        for j, i in enumerate(hot):
            if bad[i]:
                continue
            try:
                chosen[i] = torch.multinomial(probs[j], 1, generator=samplers[i].generator)[0]
            except RuntimeError:  # a distribution multinomial refuses: this row fails, not the batch
                broken[i] = True
    picked, failed = torch.stack([chosen, broken.to(chosen.dtype)]).tolist()  # one device-to-host transfer
    tokens = [None if b else t for t, b in zip(picked, failed)]
    record_logprobs(logits, tokens, samplers)
    return tokens


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -100.0  # as Neuronpedia: JSON has no -inf


def record_logprobs(logits: torch.Tensor, tokens: list[int | None], samplers: list[RowSampler]) -> None:
    """For rows asking for logprobs: log_softmax of the penalised logits divided by the row's temperature
    (by 1 when greedy), i.e. the distribution the token was drawn from before top-p; one transfer for all."""
    rows = [i for i, s in enumerate(samplers) if s.params.n_logprobs > 0 and tokens[i] is not None]
    if not rows:
        return
    device = logits.device
    idx = torch.tensor(rows, device=device)
    temps = torch.tensor([samplers[i].params.temperature or 1.0 for i in rows], device=device)
    logprobs = (logits[idx] / temps.unsqueeze(-1)).log_softmax(dim=-1)
    k = min(max(samplers[i].params.n_logprobs for i in rows), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    picked = logprobs.gather(-1, torch.tensor([[tokens[i]] for i in rows], device=device))[:, 0]
    top_values, top_ids, picked = top_values.tolist(), top_ids.tolist(), picked.tolist()
    for j, i in enumerate(rows):
        n = samplers[i].params.n_logprobs
        top = tuple((t, _finite(v)) for t, v in zip(top_ids[j][:n], top_values[j][:n]))
        samplers[i].last_logprob = TokenLogprob(tokens[i], _finite(picked[j]), top)
