"""GET /: the steering playground, one static page and its scripts and style (no build step).

These paths are open even when SECRET is set (app/auth.py): they hold no data; the page asks for
the secret and sends it with every API call it makes."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {
    "app.js": "text/javascript",
    "chart.js": "text/javascript",
    "extract.js": "text/javascript",
    "app.css": "text/css",
}
PAGE_PATHS = frozenset({"/", *(f"/playground/{name}" for name in ASSETS)})

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    """One of the page's files (only those in ASSETS: the name never reaches the file system otherwise)."""
    if name not in ASSETS:
        raise HTTPException(404, f"no playground file {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
