"""Engine observers: metrics, traces and fault injection subscribe to what the engine does instead of
replacing its methods.

Callbacks (each optional, several subscribers allowed):
- `submitted(job)`: a job was queued (event-loop thread);
- `event(job, event)`: a RowToken, RowFinished or JobFailed is handed to the job (inference thread);
- `cancelled(job)`: the engine dropped a cancelled job's rows;
- `step(info)`: one step ran (paged engine); `info` has rows, tokens, prefill_tokens, first_tokens (rows
  that got their first token) and perf_counter stamps started, emitted (just before its events left), ended;
- `before_forward(phase)`: called before each forward with "prefill" or "decode"; raising there fails
  that phase's rows (fault injection; `engine.fault` sets the one fault hook).

A subscriber's error is logged and never breaks the engine (except `before_forward`, on purpose).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CALLBACKS = ("submitted", "event", "cancelled", "step")


class EngineObservers:
    def __init__(self) -> None:
        self._subs: dict[str, list[Callable[..., Any]]] = {name: [] for name in CALLBACKS}
        self.fault: Callable[[str], None] | None = None

    def subscribe(self, **callbacks: Callable[..., Any]) -> Callable[[], None]:
        """Register callbacks by name; returns a function that unsubscribes them."""
        for name, fn in callbacks.items():
            if name not in self._subs:
                raise ValueError(f"unknown engine callback {name!r}; known: {', '.join(CALLBACKS)}")
            self._subs[name].append(fn)

        def unsubscribe() -> None:
            for name, fn in callbacks.items():
                if fn in self._subs[name]:
                    self._subs[name].remove(fn)

        return unsubscribe

    def has(self, name: str) -> bool:
        return bool(self._subs[name])

    def notify(self, name: str, *args: Any) -> None:
        for fn in list(self._subs[name]):
            try:
                fn(*args)
            except Exception:  # an observer never breaks serving
                log.exception("engine observer %s failed", name)

    def before_forward(self, phase: str) -> None:
        if self.fault is not None:
            self.fault(phase)
