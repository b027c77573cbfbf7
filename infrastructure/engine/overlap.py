"""Overlapped decode steps (OVERLAP_SCHEDULE): step N+1 is queued on the device before step N's tokens reach the host,
fed with N's greedy picks where they already are (on the GPU), so the GPU does not idle while Python samples,
streams and schedules.

A chain starts from a launched decode-only step N whose rows all pick greedily (`plan_greedy` queued their tokens
behind the forward). Before N is collected, every row of N is advanced by one position: its KV blocks grow for it,
`computed` moves past N's input, and a placeholder takes the place of N's token in the sequence (with a provisional
steering bit). Step N+1 is then built and launched as any decode step, except that its input ids, and the steering
bits that depend on the token (steering that skips special tokens), come from `Feed` on the device, and N's picks
and captures are copied to the host before N+1 is queued (`stage`: collecting N waits for N's event, not for the
stream, which holds N+1 by then). Collecting N then fills the placeholder with the real token and its real steering
bit, before anything reads them (prefix-cache keys, the next host-fed step). A row that ends at N (end of sequence,
a stop string, a failed row) is gone when N+1 is collected: its N+1 token is dropped, like a launched-ahead step's.
A step that cannot chain (prefill, sampling, logprobs, grammar, a row near its length limit, a reader behind, queued
work, a fault hook, a short KV pool) runs as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from infrastructure.engine.launched import Launched
from infrastructure.engine.sampling import plan_greedy

log = logging.getLogger(__name__)

PENDING = -1  # the placeholder of a token still on the device


@dataclass
class Feed:
    """A chained step's inputs still on the device: one token per row, and which rows clear their steering
    bit when that token is special."""

    tokens: torch.Tensor  # [n] long
    check: torch.Tensor | None  # [n] bool (None: no row's bit depends on the token)
    specials: torch.Tensor  # [k] long: the tokenizer's special ids
    checks: list[bool] | None = None  # `check` on the host (what tensor-parallel workers are sent)

    @classmethod
    def of(cls, tokens: torch.Tensor, checks: list[bool] | None, specials: torch.Tensor) -> Feed:
        """The feed of these device tokens; `checks`: per row, whether its bit depends on the token (None: none)."""
        check = torch.tensor(checks).to(tokens.device, non_blocking=True) if checks and any(checks) else None
        return cls(tokens, check, specials, checks if check is not None else None)

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        """The rows' steering bits [n] with the token-dependent ones cleared where the token is special."""
        if self.check is None:
            return bits
        return bits & ~(self.check & torch.isin(self.tokens, self.specials))


def stage(step) -> None:
    """Queue the copies of a step's picks and captures to the host behind its forward, before the next step is
    queued, and mark them with an event: collecting the step then waits for its own results only (a plain
    transfer would wait for everything queued on the stream, the chained step included)."""
    if step.planned is None or step.planned.device.type != "cuda":
        return
    step.planned = step.planned.to("cpu", non_blocking=True)  # (pinned: the copy does not block the host)
    step.captured = {k: v.to("cpu", non_blocking=True) for k, v in step.captured.items()}
    step.ready = torch.cuda.Event()
    step.ready.record()


class OverlapSteps:
    """Mixed into the paged loop: `_chain` launches the step after a launched one from its device tokens."""

    def _may_chain(self, step) -> bool:
        if not self.overlap or step.planned is None or step.prefill or step.scored:
            return False
        if self.fault is not None or self._pending or self._sched.waiting:
            return False
        live = {id(r) for r in self._live}
        for row, n in step.items:
            if n != 1 or id(row) not in live or row.job.cancelled or self._reader_behind(row.seq):
                return False
            if len(row.generated) + 2 > row.max_new:  # N's token is the row's last: nothing to chain
                return False
        return self._kv.free_blocks >= len(step.items)  # a new block per row at most: no preemption

    def _chain(self, step):
        """Advance the rows of the launched step `step` by one position and launch the next step on its
        device tokens. Returns the new Launched, or None (the rows stay advanced: the next step feeds the real
        tokens from the host once `step` is collected)."""
        started = time.perf_counter()
        rows = [r for r, _ in step.items]
        for row in rows:
            if not self._kv.allocate(row.seq.seq_id, row.seq.computed + 2):
                return None  # (allocated blocks stay with their rows: the next step needs them anyway)
        for row in rows:
            row.seq.computed += 1
            row.seq.tokens.append(PENDING)
            row.steer_bits.extend(row.steer_mask([PENDING], False, frozenset()))
        step.advanced = True
        works = [self._work(r, 1) for r in rows]
        feed = self._feed(step.planned[0], rows)
        stage(step)
        try:
            tables = self._row_tables(rows)
            logits, captured = self._forward_step(works, tables, feed)
            planned = plan_greedy(logits, [r.sampler for r in rows])
        except Exception:  # the next step schedules these rows again (and fails them if it fails again)
            log.debug("chained launch failed; the step runs again in turn", exc_info=True)
            return None
        self.chained_launches += 1
        return Launched([(r, 1) for r in rows], works, [], logits, captured, [], len(rows), started, planned)

    def _feed(self, tokens: torch.Tensor, rows: list) -> Feed:
        if self._specials is None or self._specials.device != tokens.device:
            self._specials = torch.tensor(sorted(self.special_ids) or [PENDING], device=tokens.device)
        return Feed.of(tokens, [r.bit_needs_token() for r in rows], self._specials)
