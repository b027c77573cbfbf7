"""Optional shared-secret auth (pure ASGI, so streaming and disconnects pass through untouched).

With SECRET (or API_KEY) set, every route but /health, /ping (RunPod's load balancer) and the playground page needs
`X-SECRET-KEY: <secret>` (Neuronpedia) or `Authorization: Bearer <secret>` (RunPod, OpenAI);
compared in constant time. With ADMIN_SECRET set, writes to the shared vector registry
(POST/DELETE under /api/v1/vectors) need that secret instead: readers of the API cannot rewrite
what every other user steers with."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_body_for

# exact paths only (no prefixes): the probes (/health, RunPod's /ping), and the playground page with its static files,
# which hold no data (the page sends the secret the user types with every API call it makes)
OPEN_PATHS = frozenset(
    {
        "/health",
        "/ping",
        "/",
        "/playground/app.js",
        "/playground/app.css",
        "/playground/chart.js",
        "/playground/extract.js",
    }
)
REGISTRY_PREFIX = "/api/v1/vectors"
PRESETS_PREFIX = "/api/v1/presets"  # steering presets are shared state too
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_registry_write(method: str, path: str) -> bool:
    prefixes = (REGISTRY_PREFIX, PRESETS_PREFIX)
    return method in WRITE_METHODS and any(path == p or path.startswith(p + "/") for p in prefixes)


def describe_auth(secret: str | None, admin_secret: str | None) -> str:
    """One start-up log line saying who can call the API and who can write the registry."""
    reads = "on (SECRET/API_KEY required on every route but /health)" if secret else "OFF (no SECRET or API_KEY)"
    if admin_secret:
        writes = "ADMIN_SECRET"
    else:
        writes = "SECRET holders" if secret else "anyone who can reach the server"
    return f"auth {reads}; registry writes: {writes}"


def presented_secret(headers: dict[bytes, bytes]) -> bytes | None:
    if b"x-secret-key" in headers:
        return headers[b"x-secret-key"].strip()
    auth = headers.get(b"authorization", b"")
    scheme, _, token = auth.partition(b" ")
    if scheme.lower() == b"bearer" and token:
        return token.strip()
    return None


class SecretAuthMiddleware:
    def __init__(self, app: ASGIApp, secret: str | None, admin_secret: str | None = None) -> None:
        self.app = app
        self.secret = secret.encode() if secret else None
        self.admin_secret = admin_secret.encode() if admin_secret else None

    def _required(self, scope: Scope) -> tuple[bytes | None, str]:
        """The secret this request needs (None: open) and what to call it in the 401."""
        if self.admin_secret is not None and is_registry_write(scope["method"], scope["path"]):
            return self.admin_secret, "the registry admin secret (ADMIN_SECRET)"
        return self.secret, "secret"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        required, what = self._required(scope)
        given = presented_secret(dict(scope["headers"]))
        if required is None or (given is not None and hmac.compare_digest(given, required)):
            await self.app(scope, receive, send)
            return
        message = f"missing or wrong {what}: send X-SECRET-KEY or Authorization: Bearer"
        body = json.dumps(error_body_for(scope["path"], "unauthorized", message)).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
