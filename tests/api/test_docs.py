"""/docs and /redoc point at assets the server serves itself (no CDN); the asset route serves only
its four files. No model is loaded: these are part of the fast tests."""

from __future__ import annotations

import pytest

from app.factory import create_app
from app.settings import Settings
from tests.helpers import client_for


@pytest.fixture
async def client():
    """The app before any model is loaded (the lifespan does not run here): the pages need none."""
    async with client_for(create_app(Settings(_env_file=None))) as c:
        yield c


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", ["/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"]),
        ("/redoc", ["/docs-assets/redoc.standalone.js"]),
    ],
)
async def test_doc_pages_load_their_assets_from_this_server(client, page, assets):
    r = await client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text, "a page must not reach outside the server"
    for url in assets:
        assert f'"{url}"' in r.text
        asset = await client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100_000, url


async def test_swagger_bundle_is_the_real_one(client):
    r = await client.get("/docs-assets/swagger-ui-bundle.js")
    assert r.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in r.content


@pytest.mark.parametrize("name", ["index.html", "..%2F__init__.py", "core.py", "favicon.ico"])
async def test_asset_route_serves_only_its_files(client, name):
    r = await client.get(f"/docs-assets/{name}")
    assert r.status_code == 404
    assert set(r.json()) == {"error"}
