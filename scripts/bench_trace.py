"""The serving benchmark's engine-side trace: where each request's time to first token goes."""

from __future__ import annotations

import collections
import statistics
import sys
import threading
import time
import traceback

import torch


class EngineTrace:
    """When jobs reached the engine, what each step with prompt tokens took and when it handed out first tokens:
    where the time to first token goes. Subscribed to `engine.observers` for the duration of one workload."""

    def __init__(self, engine, sample_s: float = 0.0) -> None:
        self.engine, self.arrivals, self.prefills, self.emitted = engine, [], [], []
        self.steps: list[tuple[float, float, int, int, int]] = []  # started, ended, rows, prefill tokens, firsts
        self.sampler = StackSampler(sample_s) if sample_s else None

    def __enter__(self) -> EngineTrace:
        def submitted(job) -> None:
            self.arrivals.append(time.perf_counter())

        def step(info: dict) -> None:
            if len(self.steps) < 400:
                self.steps.append((info["started"], info["ended"], info["rows"], info["prefill_tokens"],
                                   info["first_tokens"]))  # fmt: skip
            if info["prefill_tokens"]:
                self.prefills.append((info["first_tokens"], info["started"], info["ended"]))
            if info["first_tokens"]:  # stamped before the events leave, so every first frame comes after it
                self.emitted.append(info["emitted"])

        self._unsubscribe = self.engine.observers.subscribe(submitted=submitted, step=step)
        self.allocator = self._allocator()
        self.compiled, self.captures = self._compiled(), self._captures()
        self.cpu = thread_cpu()
        if self.sampler is not None:
            self.sampler.start()
        return self

    def _captures(self) -> int:
        graphs = getattr(self.engine, "_graphs", None)
        return graphs.captures if graphs is not None else 0

    @staticmethod
    def _compiled() -> int:
        """Graphs dynamo compiled so far in this process (a recompile while serving shows here)."""
        try:
            return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        except Exception:  # noqa: BLE001 - no dynamo: nothing compiled
            return 0

    @staticmethod
    def _allocator() -> dict:
        """cudaMalloc calls and out-of-memory retries (each retry frees the cache and synchronises)."""
        if not torch.cuda.is_available():
            return {}
        stats = torch.cuda.memory_stats()
        return {key: stats.get(key, 0) for key in ("num_device_alloc", "num_alloc_retries")}

    def __exit__(self, *exc) -> None:
        self._unsubscribe()
        self.cpu = {name: seconds - self.cpu.get(name, 0.0) for name, seconds in thread_cpu().items()}
        if self.sampler is not None:
            self.sampler.stop()

    def timeline(self) -> list[list]:
        """The steps until every request had its first token: [start ms after the first arrival, ms, rows,
        prefill tokens, first tokens handed out], and each request's arrival as ["arrival", ms]."""
        if not self.arrivals:
            return []
        t0 = min(self.arrivals)
        out, firsts = [], 0
        for started, ended, rows, prefill, first in self.steps:
            out.append([round(1000 * (started - t0), 1), round(1000 * (ended - started), 1), rows, prefill, first])
            firsts += first
            if firsts >= len(self.arrivals):
                break
        return out

    def summary(self, results: list) -> dict:
        """perf_counter is one monotonic clock for every process of the machine: client times compare."""
        if not self.arrivals or not self.prefills:
            return {}
        firsts = [r.token_frames[0] if r.token_frames else r.ended for r in results]
        after = [first - max((e for e in self.emitted if e <= first), default=first) for first in firsts]
        started = statistics.median(r.started for r in results)
        return (
            {
                "arrival_spread_ms": 1000 * (max(self.arrivals) - min(self.arrivals)),
                "to_engine_p50_ms": 1000 * (statistics.median(self.arrivals) - started),
                "prefills": len(self.prefills),
                "prefill_rows": [n for n, _, _ in self.prefills],
                "prefill_ms_total": sum(1000 * (end - start) for _, start, end in self.prefills),
                "first_frame_after_prefill_p50_ms": 1000 * statistics.median(after),
                "graphs_compiled": self._compiled() - self.compiled,
                "graph_captures": self._captures() - self.captures,
                "arrivals_ms": [round(1000 * (a - min(self.arrivals)), 1) for a in sorted(self.arrivals)][
                    :: max(1, len(self.arrivals) // 16)
                ],
                "steps_to_first_tokens": self.timeline(),
                "thread_cpu_s": {name: round(seconds, 3) for name, seconds in self.cpu.items() if seconds > 0.0005},
            }
            | {key: value - self.allocator[key] for key, value in self._allocator().items()}
            | ({"stacks": self.sampler.top(40)} if self.sampler is not None else {})
        )


def thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by the server's threads, by kind: the inference thread, the event loop (uvicorn), the
    worker threads (prompt rendering) and the rest. The inference thread's includes its spin in CUDA syncs."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        kind = "inference" if t.name.startswith("persona") else "event loop" if "uvicorn" in t.name else (
            "workers" if t.name.startswith(("AnyIO", "asyncio")) else "other")  # fmt: skip
        try:
            seconds = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, AttributeError, TypeError):  # a thread that just ended, or no per-thread clocks here
            continue
        out[kind] = out.get(kind, 0.0) + seconds
    return out


class StackSampler:
    """Where the process's threads are, sampled every 2 ms for the first `seconds` of a workload (pure Python, so
    a sample lands when this thread gets the GIL): counts of each thread's innermost frames, to see what the
    inference thread and the event loop do while a burst of requests arrives."""

    def __init__(self, seconds: float, every: float = 0.002, depth: int = 5) -> None:
        self.seconds, self.every, self.depth = seconds, every, depth
        self.counts: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        names = {}
        end = time.perf_counter() + self.seconds
        me = threading.get_ident()
        while not self._stop.is_set() and time.perf_counter() < end:
            for t in threading.enumerate():
                names[t.ident] = t.name
            for ident, frame in sys._current_frames().items():
                name = names.get(ident, "?")
                if ident == me or not name.startswith(("persona", "bench-uvicorn", "asyncio", "AnyIO")):
                    continue
                stack = traceback.extract_stack(frame)[-self.depth :]
                where = " < ".join(f"{f.name}:{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(stack))
                self.counts[(name.split("_")[0], where)] += 1
            time.sleep(self.every)

    def top(self, n: int) -> list[list]:
        return [[count, thread, where] for (thread, where), count in self.counts.most_common(n)]


class KVWatch:
    """Samples the paged engine's KV blocks every step: peak blocks used, and blocks used × block size over
    the tokens whose keys/values are in the cache (1.0 = no waste beyond partly filled last blocks)."""

    def __init__(self, engine) -> None:
        self.engine, self.peak_blocks, self.ratios = engine, 0, []

    def __enter__(self) -> KVWatch:
        def step(info: dict) -> None:
            if info.get("kv_cached_tokens"):
                self.peak_blocks = max(self.peak_blocks, info["kv_used_blocks"])
                self.ratios.append(info["kv_used_blocks"] * info["kv_block_size"] / info["kv_cached_tokens"])

        self._unsubscribe = self.engine.observers.subscribe(step=step)
        return self

    def __exit__(self, *exc) -> None:
        self._unsubscribe()

    def summary(self) -> dict:
        kv = self.engine.kv_stats()
        if not kv or not self.ratios:
            return {}
        per_token = getattr(self.engine, "kv_bytes_per_token", 0)
        return {
            "kv_peak_blocks": self.peak_blocks,
            "kv_peak_gb": self.peak_blocks * kv["kv_block_size"] * per_token / 1e9,
            "kv_pool_gb": kv["kv_blocks_total"] * kv["kv_block_size"] * per_token / 1e9,
            "kv_used_over_live_max": max(self.ratios),
            "kv_used_over_live_median": statistics.median(self.ratios),
            "prefix_hit_rate": kv["prefix_hit_rate"],
            "preemptions": kv["preemptions"],
        }
