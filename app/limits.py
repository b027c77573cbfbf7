"""Request limits enforced before any model work: body size and a per-client rate limit (the `limits`
library under slowapi), both pure ASGI and answering in the one error shape."""

from __future__ import annotations

import json
import math
import time

from fastapi import FastAPI
from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body_for

EXEMPT_PATHS = frozenset({"/health"})  # probes must never be throttled


def _too_large(limit: int) -> str:
    return f"request body exceeds {limit} bytes (MAX_BODY_BYTES)"


class BodySizeLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, else while counting the chunks
    of a streamed (chunked) body as the app reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, _too_large(self.max_bytes))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except StarletteHTTPException as exc:  # raised outside a route's own error handling
            if exc.status_code != 413 or started:
                raise
            await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        message = _too_large(self.max_bytes)
        body = json.dumps(error_body_for(scope["path"], "payload_too_large", message, "body")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RateLimitMiddleware:
    """Per-client-address budget over every route but /health, in memory (one process), moving window.

    slowapi's middleware finds routes by walking `app.routes`, which FastAPI >= 0.160 hides behind
    included-router wrappers, so it would skip every route; this applies the same `limits` library
    directly, without a route lookup."""

    def __init__(self, app: ASGIApp, rate_limit: str) -> None:
        self.app = app
        self.items = parse_many(rate_limit)
        self.window = MovingWindowRateLimiter(MemoryStorage())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        over = next((item for item in self.items if not self.window.hit(item, "client", client)), None)
        if over is None:
            await self.app(scope, receive, send)
            return
        reset = self.window.get_window_stats(over, "client", client).reset_time
        retry = max(1, math.ceil(reset - time.time()))
        message = f"rate limit exceeded: {over} per client (RATE_LIMIT)"
        body = json.dumps(error_body_for(scope["path"], "rate_limited", message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry).encode()),
            (b"x-ratelimit-limit", str(over.amount).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install_rate_limit(app: FastAPI, rate_limit: str) -> None:
    """Add the per-client limit ("120/minute", several separated by ';'); '' leaves it off."""
    if rate_limit.strip():
        app.add_middleware(RateLimitMiddleware, rate_limit=rate_limit)
