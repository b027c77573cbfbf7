"""Fault injection for tests and drills: FAULT_INJECTION="decode:3" makes the 3rd decode forward raise.

The engine calls `engine.fault(phase)` before every forward ("prefill" or "decode"); a raise there
fails only the batch being run, which is exactly the failure the server must survive."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

PHASES = ("prefill", "decode")


class InjectedFault(RuntimeError):
    """The error an injected fault raises (an ordinary exception inside one batch)."""


@dataclass
class FaultRule:
    phase: str
    nth: int  # fire on the nth forward of this phase, counted from installation
    oom: bool = False
    fired: bool = False


def parse_faults(spec: str) -> list[FaultRule]:
    """Rules from "phase:n[:oom]" items separated by commas; empty text gives no rule."""
    rules = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        phase, _, rest = item.partition(":")
        count, _, kind = rest.partition(":")
        if phase not in PHASES or not count.isdigit() or int(count) < 1 or kind not in ("", "oom"):
            raise ValueError(f"bad fault rule {item!r}: expected prefill|decode:<n>[:oom]")
        rules.append(FaultRule(phase, int(count), oom=kind == "oom"))
    return rules


class FaultInjector:
    """A callable for `engine.fault`: counts forwards per phase and raises once per rule."""

    def __init__(self, rules: list[FaultRule]) -> None:
        self.rules = rules
        self.counts = dict.fromkeys(PHASES, 0)
        self._lock = threading.Lock()

    def __call__(self, phase: str) -> None:
        with self._lock:
            self.counts[phase] = self.counts.get(phase, 0) + 1
            n = self.counts[phase]
            rule = next((r for r in self.rules if r.phase == phase and r.nth == n and not r.fired), None)
            if rule is None:
                return
            rule.fired = True
        if rule.oom:
            raise torch.OutOfMemoryError(f"injected out-of-memory on {phase} forward {rule.nth}")
        raise InjectedFault(f"injected fault on {phase} forward {rule.nth}")

    @property
    def fired(self) -> int:
        return sum(r.fired for r in self.rules)


def build_fault(spec: str) -> Callable[[str], None] | None:
    """The engine.fault callable for a FAULT_INJECTION value, or None when it is empty."""
    rules = parse_faults(spec)
    return FaultInjector(rules) if rules else None
