"""The playground end to end in headless Chromium (Debian's `chromium`, driven by Playwright):
the page loads with auth on, streams the steered and default answers, and draws the axis chart;
sliders span the recommended range, STEERED and DEFAULT continue their own histories, the chart
shows only the current run, and the extract panel registers a new vector."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

from app.factory import create_app
from infrastructure.persona.axis_data import AssistantAxis
from infrastructure.storage.traits import Trait
from tests.api.live_server import serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "playground.png"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SECRET = "playground-secret"


def _unit(seed: int) -> torch.Tensor:
    v = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.fixture(scope="module")
def page_runtime(make_runtime):
    """Its own runtime: auth on, one synthetic trait, and a synthetic assistant axis (so the chart has data)."""
    rt = make_runtime(secret=SECRET)
    vectors = {10: _unit(21) * 60, 15: _unit(22) * 60}
    rt.traits.add(Trait("friendly", MODEL, vectors, {"recommended_layer": 10}, Path("<test>"), description="synthetic"))
    meta = {"recommended_layer": 10, "recommended_scalar": 4.0, "recommended_scalar_range": [-4.0, 4.0]}
    rt.traits.add(Trait("ranged", MODEL, {10: _unit(24) * 20}, meta, Path("<test>"), description="synthetic"))
    rt.axis, rt.axis_problem = AssistantAxis(MODEL, 15, _unit(23), torch.zeros(576)), None
    return rt


@pytest.fixture(scope="module")
def base_url(page_runtime):
    with serve(create_app(runtime=page_runtime)) as url:
        yield url


def _fill_conversation(page) -> None:
    page.locator(".message textarea").nth(1).fill("Hi! Who are you?")
    page.click("#add-assistant")
    page.locator(".message textarea").nth(2).fill("I am a helpful assistant.")
    page.click("#add-user")
    page.locator(".message textarea").nth(3).fill("Tell me about your favourite book.")


def test_playground_streams_both_answers_and_draws_the_chart(browser, base_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(base_url + "/")
    assert page.title().startswith("Steering playground")
    page.wait_for_selector("#traits .error")  # auth is on and no secret yet
    assert "401" in page.inner_text("#traits")
    page.fill("#secret", SECRET)
    page.dispatch_event("#secret", "change")
    page.wait_for_selector('.trait[data-trait="friendly"]')
    assert page.inner_text("#model") == MODEL
    page.locator('.trait[data-trait="friendly"] input[type=range]').evaluate(
        "el => { el.value = '1'; el.dispatchEvent(new Event('input')); }"
    )
    _fill_conversation(page)
    page.fill("#max-tokens", "12")
    page.evaluate(  # record what the page shows after every frame it reads
        """() => {
            window.seen = [];
            const show = window.showFrame;
            window.showFrame = (frame) => {
                show(frame);
                window.seen.push([performance.now(), document.getElementById('out-STEERED').textContent,
                                  document.getElementById('out-DEFAULT').textContent]);
            };
        }"""
    )
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent !== 'generating…'", timeout=240_000)
    assert page.inner_text("#status") == "done", page.inner_text("#status")
    steered, default = page.inner_text("#out-STEERED"), page.inner_text("#out-DEFAULT")
    assert steered and default and steered != default
    seen = page.evaluate("window.seen")
    print([(round(t), len(a), len(b)) for t, a, b in seen])
    # the text arrived frame by frame: several distinct, growing prefixes of each final answer
    for column, final in ((1, steered), (2, default)):
        shown = [s[column] for s in seen if s[column]]
        assert len(set(shown)) > 2 and all(final.startswith(text) for text in shown)
    assert page.locator("#axis-chart polyline").count() == 2
    assert page.locator("#axis-chart circle.pt-STEERED").count() == 2  # prior assistant turn + the new one
    assert page.locator("#axis-chart circle.pt-DEFAULT").count() == 2
    ARTIFACT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACT), full_page=True)

    # the DEFAULT column is what the API answers for the same chat alone
    messages = page.evaluate("messages()")
    body = {
        "prompt": messages,
        "types": ["DEFAULT"],
        "seed": 42,
        "temperature": 0,
        "n_completion_tokens": 12,
        "stream": False,
    }
    r = httpx.post(f"{base_url}/v1/steer/completion-chat", json=body, headers={"X-SECRET-KEY": SECRET}, timeout=240)
    final = r.json()
    assert final["outputs"][0]["chat_template"][-1]["content"] == default

    # a raw vector of the wrong size is refused by the server and the page says so
    page.fill("#raw-vector", "[0.5, 1.5]")
    page.locator('.trait[data-trait="friendly"] input[type=range]').evaluate(
        "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
    )
    page.click("#run")
    page.wait_for_selector("#status.error")
    assert "vector" in page.inner_text("#status")
    assert page.locator("#axis-chart *").count() == 0  # the failed run cleared the previous run's chart
    page.close()


def _open(browser, base_url):
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(base_url + "/")
    page.fill("#secret", SECRET)
    page.dispatch_event("#secret", "change")
    page.wait_for_selector('.trait[data-trait="ranged"]')
    return page


def _wait_done(page) -> str:
    page.wait_for_function("document.getElementById('status').textContent !== 'generating…'", timeout=240_000)
    return page.inner_text("#status")


def test_sliders_span_the_recommended_range_and_can_go_beyond(browser, base_url):
    page = _open(browser, base_url)
    ranged = page.locator('.trait[data-trait="ranged"] input[type=range]')
    assert (ranged.get_attribute("min"), ranged.get_attribute("max")) == ("-4", "4")
    friendly = page.locator('.trait[data-trait="friendly"] input[type=range]')
    assert friendly.get_attribute("max") == "20"  # no recorded range: the fallback span
    page.check("#beyond")
    assert page.locator('.trait[data-trait="ranged"] input[type=range]').get_attribute("max") == "12"
    number = page.locator('.trait[data-trait="ranged"] input[type=number]')
    number.fill("30")
    number.dispatch_event("change")
    assert page.locator('.trait[data-trait="ranged"] input[type=range]').get_attribute("max") == "30"
    assert page.evaluate("vectors()") == [{"trait": "ranged", "strength": 30, "hook": "blocks.10.hook_resid_post"}]
    page.close()


def test_columns_keep_their_own_histories_and_the_chart_only_the_current_run(browser, base_url, engine):
    page = _open(browser, base_url)
    page.locator('.trait[data-trait="ranged"] input[type=number]').fill("4")
    page.locator('.trait[data-trait="ranged"] input[type=number]').dispatch_event("change")
    page.locator(".message textarea").nth(1).fill("Tell me about your weekend.")
    page.fill("#max-tokens", "8")
    page.click("#run")
    assert _wait_done(page) == "done"
    first = {t: page.inner_text(f"#out-{t}") for t in ("STEERED", "DEFAULT")}
    assert first["STEERED"] != first["DEFAULT"]
    assert page.locator("#axis-chart circle.pt-STEERED").count() == 1
    assert "above 0" in page.inner_text("#axis-sign")
    ticks = [
        float(t)
        for t in page.locator("#axis-chart text.tick").all_text_contents()
        if not t.startswith(("turn", "st", "de"))
    ]
    steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:])}
    assert len(ticks) >= 3 and len(steps) == 1  # evenly spaced round ticks

    page.fill("#follow-up", "Tell me more.")
    page.click("#continue")
    assert _wait_done(page) == "done"
    # each column continued after its own answer
    assert first["STEERED"] in page.inner_text("#hist-STEERED") and first["DEFAULT"] in page.inner_text("#hist-DEFAULT")
    assert first["DEFAULT"] not in page.inner_text("#hist-STEERED")
    assert page.locator("#axis-chart circle.pt-STEERED").count() == 2  # prior answer + the new one, its own history
    history = page.evaluate("state.histories.DEFAULT")
    assert [m["role"] for m in history[-3:]] == ["user", "assistant", "user"]
    body = {"prompt": history, "types": ["DEFAULT"], "seed": 42, "temperature": 0, "n_completion_tokens": 8}
    r = httpx.post(
        f"{base_url}/v1/steer/completion-chat",
        json={**body, "stream": False},
        headers={"X-SECRET-KEY": SECRET},
        timeout=240,
    )
    assert r.json()["outputs"][0]["chat_template"][-1]["content"] == page.inner_text("#out-DEFAULT")

    # a stopped run leaves no chart of an earlier run behind
    page.fill("#max-tokens", "400")
    page.click("#run")
    page.wait_for_function("document.getElementById('out-DEFAULT').textContent.length > 0", timeout=120_000)
    page.click("#stop")
    assert _wait_done(page) == "stopped"
    assert page.locator("#axis-chart *").count() == 0 and "stopped" in page.inner_text("#axis-note")
    page.close()
    deadline = time.monotonic() + 60  # the engine drops the abandoned row at its next step
    while (engine.active_requests or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active_requests == 0


def test_extract_panel_registers_a_vector_with_progress(browser, base_url):
    page = _open(browser, base_url)
    page.click("#extract summary")
    page.click("#ex-sample")
    page.fill("#ex-name", "pirate-ui")
    page.evaluate(
        """() => { window.progress = []; const bar = document.getElementById('ex-progress');
                   new MutationObserver(() => window.progress.push(Number(bar.value)))
                     .observe(bar, { attributes: true, attributeFilter: ['value'] }); }"""
    )
    page.click("#ex-run")
    page.wait_for_function("!document.getElementById('ex-run').disabled", timeout=300_000)
    status = page.inner_text("#ex-status")
    assert status.startswith("registered pirate-ui: layer"), status
    row = page.locator('.trait[data-trait="pirate-ui"]')
    meta = httpx.get(f"{base_url}/api/v1/vectors/pirate-ui", headers={"X-SECRET-KEY": SECRET}).json()["metadata"]
    assert float(row.locator("input[type=number]").input_value()) == meta["recommended_scalar"]
    assert row.locator("input[type=range]").get_attribute("max") == str(meta["recommended_scalar_range"][1])
    progress = page.evaluate("window.progress")
    assert len(set(progress)) >= 3 and progress == sorted(progress)  # the bar followed the engine jobs
    assert page.evaluate("document.getElementById('ex-progress').hidden")
    page.fill("#ex-name", "pirate-ui")
    page.click("#ex-run")
    page.wait_for_selector("#ex-status.error")
    assert "409" in page.inner_text("#ex-status")
    page.close()
