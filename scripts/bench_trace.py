"""The serving benchmark's engine-side trace: where each request's time to first token goes."""

from __future__ import annotations

import statistics
import time

import torch


class EngineTrace:
    """When jobs reached the engine, what each step with prompt tokens took and when it handed out first tokens:
    where the time to first token goes. Subscribed to `engine.observers` for the duration of one workload."""

    def __init__(self, engine) -> None:
        self.engine, self.arrivals, self.prefills, self.emitted = engine, [], [], []

    def __enter__(self) -> EngineTrace:
        def submitted(job) -> None:
            self.arrivals.append(time.perf_counter())

        def step(info: dict) -> None:
            if info["prefill_tokens"]:
                self.prefills.append((info["first_tokens"], info["started"], info["ended"]))
            if info["first_tokens"]:  # stamped before the events leave, so every first frame comes after it
                self.emitted.append(info["emitted"])

        self._unsubscribe = self.engine.observers.subscribe(submitted=submitted, step=step)
        self.allocator = self._allocator()
        return self

    @staticmethod
    def _allocator() -> dict:
        """cudaMalloc calls and out-of-memory retries (each retry frees the cache and synchronises)."""
        if not torch.cuda.is_available():
            return {}
        stats = torch.cuda.memory_stats()
        return {key: stats.get(key, 0) for key in ("num_device_alloc", "num_alloc_retries")}

    def __exit__(self, *exc) -> None:
        self._unsubscribe()

    def summary(self, results: list) -> dict:
        """perf_counter is one monotonic clock for every process of the machine: client times compare."""
        if not self.arrivals or not self.prefills:
            return {}
        firsts = [r.token_frames[0] if r.token_frames else r.ended for r in results]
        after = [first - max((e for e in self.emitted if e <= first), default=first) for first in firsts]
        started = statistics.median(r.started for r in results)
        return {
            "arrival_spread_ms": 1000 * (max(self.arrivals) - min(self.arrivals)),
            "to_engine_p50_ms": 1000 * (statistics.median(self.arrivals) - started),
            "prefills": len(self.prefills),
            "prefill_rows": [n for n, _, _ in self.prefills],
            "prefill_ms_total": sum(1000 * (end - start) for _, start, end in self.prefills),
            "first_frame_after_prefill_p50_ms": 1000 * statistics.median(after),
        } | {key: value - self.allocator[key] for key, value in self._allocator().items()}
