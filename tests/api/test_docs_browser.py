"""/docs (Swagger UI) and /redoc render in headless Chromium with every request outside the server
refused: their JavaScript and CSS come from the server itself (api/routes/docs.py), not a CDN."""

from __future__ import annotations

import httpx
import pytest

from tests.api.live_server import serve
from tests.api.test_openapi_examples import repeng_file

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


def test_swagger_try_it_out_registers_a_repeng_upload_with_the_form_as_shown(browser, base_url, tmp_path, loaded_model):
    """The upload form exactly as Swagger UI fills it (only the file chosen) registers the file."""
    page = _offline_page(browser, base_url)
    page.goto(base_url + "/docs")
    operation = page.locator("#operations-Vector_registry-create_api_v1_vectors_post")
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    operation.locator(".body-param-content-type select").select_option("multipart/form-data")
    data = repeng_file(tmp_path, range(1, loaded_model.n_layers), loaded_model.hidden_size)
    operation.locator("input[type=file]").set_input_files(
        {"name": "repeng.gguf", "mimeType": "application/octet-stream", "buffer": data}
    )
    try:
        with page.expect_response(lambda r: r.url.endswith("/api/v1/vectors") and r.request.method == "POST") as sent:
            operation.locator("button.execute").click()
        response = sent.value
        assert response.status == 201, response.text()
        body = response.json()
        assert body["name"] == "my-control-vector" and body["layers"] == list(range(1, loaded_model.n_layers))
        assert page.outside == [] and page.errors == []
    finally:
        httpx.delete(f"{base_url}/api/v1/vectors/my-control-vector", timeout=60)
        page.close()
