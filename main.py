"""Entry point: `pipenv run python main.py` serves on HOST:PORT with the configured (or embedded) model."""

from __future__ import annotations

import logging

import uvicorn

from app.factory import create_app
from app.serve import build_server, server_options
from app.settings import Settings


def build_app():
    """Factory for uvicorn (`uvicorn --factory main:build_app`); each worker loads its own model."""
    return create_app(Settings())


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:  # each worker process stops by uvicorn's own rules (no engine drain)
        uvicorn.run(
            "main:build_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            **server_options(settings),
        )
    else:
        build_server(settings, create_app(settings)).run()


if __name__ == "__main__":
    main()
