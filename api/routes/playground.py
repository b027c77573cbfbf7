"""GET /: the steering playground, one static page and its script and style (no build step).

These paths are open even when SECRET is set (app/auth.py): they hold no data; the page asks for
the secret and sends it with every API call it makes."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
PAGE_PATHS = frozenset({"/", *(f"/playground/{name}" for name in ASSETS)})

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/playground/app.js")
async def script() -> FileResponse:
    return FileResponse(STATIC / "app.js", media_type=ASSETS["app.js"], headers={"Cache-Control": "no-cache"})


@router.get("/playground/app.css")
async def style() -> FileResponse:
    return FileResponse(STATIC / "app.css", media_type=ASSETS["app.css"], headers={"Cache-Control": "no-cache"})
