"""EngineObservers: named callbacks, unsubscribe, a failing subscriber never breaks the engine, the fault hook."""

from __future__ import annotations

import pytest

from infrastructure.engine.observers import EngineObservers


def test_callbacks_run_in_order_and_unsubscribe_removes_only_their_own():
    obs = EngineObservers()
    seen = []
    first = obs.subscribe(step=lambda info: seen.append(("a", info["rows"])))
    obs.subscribe(step=lambda info: seen.append(("b", info["rows"])))
    obs.notify("step", {"rows": 3})
    first()
    obs.notify("step", {"rows": 4})
    assert seen == [("a", 3), ("b", 3), ("b", 4)]
    assert obs.has("step") and not obs.has("event")


def test_a_failing_subscriber_is_logged_not_raised(caplog):
    obs = EngineObservers()
    obs.subscribe(event=lambda job, event: 1 / 0)
    obs.notify("event", None, None)
    assert "engine observer event failed" in caplog.text


def test_unknown_callbacks_are_refused_and_the_fault_hook_raises_on_purpose():
    obs = EngineObservers()
    with pytest.raises(ValueError, match="unknown engine callback"):
        obs.subscribe(on_everything=print)
    obs.before_forward("decode")  # no fault: nothing happens
    obs.fault = lambda phase: (_ for _ in ()).throw(RuntimeError(phase))
    with pytest.raises(RuntimeError, match="prefill"):
        obs.before_forward("prefill")
