"""The playground end to end in headless Chromium (Debian's `chromium`, driven by Playwright):
the page loads with auth on, streams the steered and default answers, and draws the axis chart."""

from __future__ import annotations

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
    page.locator('.trait[data-trait="friendly"] input').evaluate(
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
    page.locator('.trait[data-trait="friendly"] input').evaluate(
        "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
    )
    page.click("#run")
    page.wait_for_selector("#status.error")
    assert "vector" in page.inner_text("#status")
    page.close()
