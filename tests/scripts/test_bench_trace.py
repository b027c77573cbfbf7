"""The serving benchmark's engine trace: the step timeline up to the last first token, and the stack sampler."""

from __future__ import annotations

import threading
import time

from scripts.bench_host_step import main as host_step_main
from scripts.bench_trace import EngineTrace, StackSampler


def test_timeline_runs_from_the_first_arrival_to_the_last_first_token():
    trace = EngineTrace(engine=None)
    trace.arrivals = [10.0, 10.2, 10.3]
    trace.steps = [(10.001, 10.4, 1, 128, 1), (10.4, 10.6, 3, 256, 2), (10.6, 10.61, 3, 0, 0)]
    timeline = trace.timeline()
    assert timeline == [[1.0, 399.0, 1, 128, 1], [400.0, 200.0, 3, 256, 2]]  # ends once all 3 had a first token


def test_sampler_counts_where_a_named_thread_is():
    done = threading.Event()

    def persona_busy() -> None:
        while not done.is_set():
            time.sleep(0.001)

    worker = threading.Thread(target=persona_busy, name="persona-test")
    worker.start()
    sampler = StackSampler(0.2, every=0.005, depth=2)
    sampler.start()
    time.sleep(0.1)
    sampler.stop()
    done.set()
    worker.join()
    # other threads of the process (the session's engine, event loops) are sampled too: count ours alone
    ours = [count for count, thread, where in sampler.top(100) if thread == "persona-test" and "persona_busy" in where]
    assert sum(ours) >= 3


def test_host_step_bench_reports_per_step_times(capsys):
    """The stubbed-forward decode loop (scripts/bench_host_step.py) at a tiny size: one JSON line per batch size."""
    assert host_step_main(["--rows", "1,3", "--new-tokens", "16"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and all('"step_us_median"' in line for line in lines)
