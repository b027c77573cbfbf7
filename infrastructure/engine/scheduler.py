"""Scheduler: which sequences run in the next step, and how many of their tokens (pure Python).

Every step has a token budget shared by decoding rows (one token each) and prompt chunks: a prompt
longer than what is left of the budget is split over several steps, so a 32k-token prompt delays the
decoding rows by one chunk per step instead of one whole prefill. Order of service:

1. running sequences with one token left to feed (decoding rows), oldest first;
2. running sequences still in their prompt (chunked prefill, or a recompute after preemption);
3. waiting sequences, first come first served, while rows and KV blocks allow (admission by memory:
   a sequence is admitted when the blocks for its first chunk are free; its prefix blocks may come
   from the prefix cache).

When a running sequence needs a block and the pool is empty, the most recently admitted running
sequence not yet scheduled in this step is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed (prompt + tokens generated so far) when memory allows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infrastructure.engine.kv_cache import KVCacheManager


@dataclass(eq=False)
class Seq:
    """One sequence as the scheduler sees it: its tokens (prompt + generated), how many of them are in
    the KV cache, and the prefix keys of its prompt's full blocks (None: no prefix lookup)."""

    seq_id: int
    tokens: list[int]
    prompt_len: int
    prefix_keys: Callable[[], list[bytes]] | None = None
    payload: Any = None
    computed: int = 0
    preemptions: int = 0

    @property
    def remaining(self) -> int:
        """Tokens not yet fed to the model (1 for a decoding row: its last sampled token)."""
        return len(self.tokens) - self.computed


@dataclass
class StepPlan:
    items: list[tuple[Seq, int]] = field(default_factory=list)  # (sequence, tokens fed this step)
    preempted: list[Seq] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_rows: int, token_budget: int) -> None:
        if token_budget < 1 or max_rows < 1:
            raise ValueError("the scheduler needs at least one row and one token per step")
        self.kv, self.max_rows, self.token_budget = kv, max_rows, token_budget
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.preemptions = 0
        self.holds: Callable[[Seq], bool] | None = None  # back-pressure: a decoding sequence to skip this step

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Seq) -> None:
        """Drop a sequence wherever it is (finished, cancelled, failed) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.token_budget
        decoding = [s for s in self.running if s.remaining == 1 and not (self.holds and self.holds(s))]
        prefilling = [s for s in self.running if s.remaining > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this pass
                continue
            n = min(seq.remaining, budget)
            if not self._grow(seq, n, plan):
                continue
            plan.items.append((seq, n))
            budget -= n
        if plan.preempted:  # memory is short: admit nobody this step
            return plan
        while self.waiting and budget > 0 and len(self.running) < self.max_rows:
            seq = self.waiting[0]
            hit, queried = self._prefix(seq)
            n = min(seq.remaining, budget)
            if not self.kv.allocate(seq.seq_id, seq.computed + n):
                if hit:
                    self.kv.free(seq.seq_id)
                    seq.computed = 0
                break
            if queried and seq.preemptions == 0:
                self.kv.record_lookup(queried, hit)
            self.waiting.popleft()
            self.running.append(seq)
            plan.items.append((seq, n))
            budget -= n
        return plan

    def _prefix(self, seq: Seq) -> tuple[int, int]:
        """Attach cached prefix blocks to a sequence about to be admitted: (tokens covered, tokens looked up)."""
        if seq.computed or self.kv.table(seq.seq_id) or seq.prefix_keys is None:
            return 0, 0
        keys = seq.prefix_keys()
        seq.computed = self.kv.lookup(seq.seq_id, keys)
        return seq.computed, len(keys) * self.kv.block_size

    def _grow(self, seq: Seq, n: int, plan: StepPlan) -> bool:
        """Blocks for `n` more tokens of a running sequence, preempting later ones if needed; False when
        `seq` itself had to be preempted."""
        scheduled = None  # built only when the pool is short (every decoding row calls this each step)
        while not self.kv.allocate(seq.seq_id, seq.computed + n):
            scheduled = scheduled if scheduled is not None else {id(s) for s, _ in plan.items}
            victim = next((s for s in reversed(self.running) if id(s) not in scheduled and s is not seq), None)
            self._preempt(victim or seq, plan)
            if victim is None:
                return False
        return True

    def _preempt(self, seq: Seq, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
