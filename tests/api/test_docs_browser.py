"""/docs (Swagger UI) and /redoc render in headless Chromium with every request outside the server
refused: their JavaScript and CSS come from the server itself (api/routes/docs.py), not a CDN."""

from __future__ import annotations

import pytest

from tests.api.live_server import serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# ReDoc's "API docs by Redocly" footer asks for its logo from the vendor's CDN; the bundle hides the
# image when that fails (onError), so offline the page is complete without it. Nothing else may leave.
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture(scope="module")
def base_url(app):
    with serve(app) as url:
        yield url


def _offline_page(browser, base_url: str):
    """A page whose requests to anywhere but the server are aborted and recorded."""
    page = browser.new_page()
    page.outside = []
    page.errors = []

    def route(r):
        if r.request.url.startswith(base_url):
            r.continue_()
        else:
            page.outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    return page


def test_swagger_ui_renders_every_operation_offline(browser, base_url):
    page = _offline_page(browser, base_url)
    page.goto(base_url + "/docs")
    page.wait_for_selector(".opblock", timeout=60_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/api/v1/generate" in p for p in paths) and any("/v1/chat/completions" in p for p in paths)
    assert page.locator(".opblock").count() >= 10
    assert page.inner_text(".info .title").startswith("Persona Serving API")
    assert page.outside == [] and page.errors == []
    page.close()


def test_redoc_renders_offline(browser, base_url):
    page = _offline_page(browser, base_url)
    page.goto(base_url + "/redoc")
    page.wait_for_selector("h1:has-text('Persona Serving API')", timeout=60_000)
    text = page.inner_text("body")
    for summary in ("Generate with persona steering", "Register a steering vector", "/v1/chat/completions"):
        assert summary in text
    assert set(page.outside) <= {REDOCLY_LOGO} and page.errors == []
    assert page.locator("img[alt='redocly logo']").count() == 0  # hidden after the refused request
    page.close()
