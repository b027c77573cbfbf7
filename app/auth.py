"""Optional shared-secret auth (pure ASGI, so streaming and disconnects pass through untouched).

With SECRET (or API_KEY) set, every route but /health, /ping (RunPod's load balancer) and the playground page needs
`X-SECRET-KEY: <secret>` (Neuronpedia) or `Authorization: Bearer <secret>` (RunPod, OpenAI);
compared in constant time."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_body_for

# exact paths only (no prefixes): the probe, and the playground page with its two static files,
# which hold no data (the page sends the secret the user types with every API call it makes)
OPEN_PATHS = frozenset({"/health", "/ping", "/", "/playground/app.js", "/playground/app.css"})


def presented_secret(headers: dict[bytes, bytes]) -> bytes | None:
    if b"x-secret-key" in headers:
        return headers[b"x-secret-key"].strip()
    auth = headers.get(b"authorization", b"")
    scheme, _, token = auth.partition(b" ")
    if scheme.lower() == b"bearer" and token:
        return token.strip()
    return None


class SecretAuthMiddleware:
    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.secret = secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = presented_secret(dict(scope["headers"]))
        if given is not None and hmac.compare_digest(given, self.secret):
            await self.app(scope, receive, send)
            return
        message = "missing or wrong secret: send X-SECRET-KEY or Authorization: Bearer"
        body = json.dumps(error_body_for(scope["path"], "unauthorized", message)).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
