"""Prompt scoring (echo + logprobs, log-likelihood evaluation): every prompt token's log-probability
under the model, computed from the logits of the row's own prefill in the batch it runs in.

A row asking for it (`SamplingParams.prompt_logprobs` not None) keeps the logits of every prompt position
of its prefill chunks (the runner's `logits_to_keep`); the logits at position p score token p+1. The raw
model distribution is used (temperature 1, no penalties): what a harness means by log-likelihood. Such a
row skips the prefix cache, since a position read from the cache has no logits."""

from __future__ import annotations

import math

import torch

from infrastructure.engine.job import TokenLogprob


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -100.0  # JSON has no -inf


def score_tokens(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """logits [n,V] (float) at n consecutive positions, the n tokens that follow them, and k top candidates
    per position: one TokenLogprob per position, with one device-to-host transfer."""
    logprobs = logits.float().log_softmax(dim=-1)
    index = torch.tensor(targets, device=logits.device).unsqueeze(-1)
    picked = logprobs.gather(-1, index)[:, 0].tolist()
    top_values, top_ids = ([], []) if k <= 0 else [t.tolist() for t in logprobs.topk(min(k, logprobs.shape[-1]))]
    out = []
    for j, token in enumerate(targets):
        top = tuple((t, _finite(v)) for t, v in zip(top_ids[j], top_values[j])) if k > 0 else ()
        out.append(TokenLogprob(token, _finite(picked[j]), top))
    return out


def kept_rows(counts: list[int], scores: list[bool], wants: list[bool]) -> tuple[list[int], list[int | None]]:
    """Which flat token indices a step keeps logits for, and where each work's scored rows start.

    A scoring work keeps all its tokens (its last one is also its sampling row when it wants logits);
    another work keeps its last token when it wants logits. Returns the flat indices (in order) and, per
    work, the index into the kept logits of its first scored row (None: not scoring)."""
    keep: list[int] = []
    first: list[int | None] = []
    start = 0
    for n, score, want in zip(counts, scores, wants):
        if score:
            first.append(len(keep))
            keep.extend(range(start, start + n))
        else:
            first.append(None)
            if want:
                keep.append(start + n - 1)
        start += n
    return keep, first


def sampling_rows(counts: list[int], scores: list[bool], wants: list[bool], first: list[int | None]) -> list[int]:
    """Indices into the kept logits of the rows the sampler reads (one per work that wants logits)."""
    rows, kept = [], 0
    for n, score, want, f in zip(counts, scores, wants, first):
        if score:
            if want:
                rows.append(f + n - 1)
            kept += n
        elif want:
            rows.append(kept)
            kept += 1
    return rows


def split_scored(rows: list, works: list, logits: torch.Tensor | None) -> tuple[torch.Tensor | None, list[tuple]]:
    """A step's kept logits -> (the sampler's logits [k,V], [(row, first position, logits [n,V])] of the
    scoring works). Without a scoring work the logits pass through untouched."""
    if logits is None or not any(w.score for w in works):
        return logits, []
    counts = [len(w.tokens) for w in works]
    scores, wants = [w.score for w in works], [w.wants_logits for w in works]
    _, first = kept_rows(counts, scores, wants)
    picks = sampling_rows(counts, scores, wants, first)
    sampled = logits[torch.tensor(picks, device=logits.device)] if picks else None
    scored = [(r, w.position, logits[f : f + n]) for r, w, f, n in zip(rows, works, first, counts) if f is not None]
    return sampled, scored


def row_scores(row, position: int, logits: torch.Tensor) -> None:
    """Append the scores of the prompt tokens that the logits at `position`.. predict to the row's
    `prompt_logprobs` (positions already scored, e.g. recomputed after a preemption, are skipped)."""
    ids = row.request.prompt_ids
    done = len(row.prompt_logprobs)  # tokens 0..done-1 have their entry
    skip = max(0, done - 1 - position)
    stop = min(logits.shape[0], len(ids) - 1 - position)
    if skip >= stop:
        return
    targets = list(ids[position + 1 + skip : position + 1 + stop])
    row.prompt_logprobs.extend(score_tokens(logits[skip:stop], targets, row.request.sampling.prompt_logprobs))
