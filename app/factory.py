"""create_app(settings): the FastAPI app, with nothing heavy done at import time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.openapi import install_openapi
from api.routes import (
    completion_chat,
    docs,
    extract,
    generate,
    health,
    openai,
    openai_completions,
    playground,
    presets,
    runpod,
    traits,
    vectors,
)
from app.auth import SecretAuthMiddleware, describe_auth
from app.errors import install_error_handlers
from app.limits import BodySizeLimitMiddleware, install_rate_limit
from app.metrics import install_metrics
from app.request_id import RequestIdMiddleware, configure_logging
from app.runtime import Runtime
from app.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Steer language models at inference time: persona/trait vectors added to the residual stream "
    "through forward hooks, per request, batched. Seed 002's Persona Serving API, Neuronpedia's "
    "steered completion-chat and an OpenAI-compatible API."
)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. Tests pass a `runtime` that already holds a loaded model and engine."""
    settings = settings or (runtime.settings if runtime else Settings())
    runtime = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        log.info(describe_auth(settings.secret, settings.admin_secret))
        if runtime.engine is None and runtime.load_error is None:
            runtime.load_in_background()
        yield
        await asyncio.to_thread(runtime.shutdown, settings.shutdown_timeout_s)

    # /docs and /redoc come from api/routes/docs.py (assets served locally, no CDN)
    app = FastAPI(
        title="Persona Serving API",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    routers = (health, generate, traits, completion_chat, runpod, openai, openai_completions, extract, vectors, presets)
    for module in (*routers, playground, docs):
        app.include_router(module.router)
    install_openapi(app, lambda: runtime.loaded.hidden_size if runtime.loaded is not None else None)
    _add_middleware(app, settings, runtime)
    return app


def _add_middleware(app: FastAPI, settings: Settings, runtime: Runtime) -> None:
    """Innermost first: body size, rate limit, auth, CORS, metrics, request id (outermost)."""
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    install_rate_limit(app, settings.rate_limit)
    if settings.secret or settings.admin_secret:
        app.add_middleware(SecretAuthMiddleware, secret=settings.secret, admin_secret=settings.admin_secret)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    install_metrics(app, runtime)
    app.add_middleware(RequestIdMiddleware)
