"""Running the app under uvicorn: trusted proxies and a graceful, draining shutdown.

- Forwarded headers (`X-Forwarded-For`, `-Proto`) are trusted only from FORWARDED_ALLOW_IPS. uvicorn's
  default trusts them from 127.0.0.1, so any local client could pick its own address and dodge the
  per-client rate limit.
- On SIGTERM / SIGINT uvicorn closes its listening socket at once (new clients get "connection refused")
  and sse-starlette ends its streams within half a second. `DrainingServer` instead keeps serving while
  the engine drains: new requests get 503 `engine_unavailable` (and /health 503 "stopping"), running
  jobs get SHUTDOWN_TIMEOUT_S to finish, the rest end with an error frame; then uvicorn stops. A second
  signal stops at once."""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.settings import Settings

log = logging.getLogger(__name__)


def server_options(settings: Settings) -> dict:
    """uvicorn options from settings: forwarded headers only from the configured proxies."""
    proxies = settings.forwarded_allow_ips.strip()
    return {"proxy_headers": bool(proxies), "forwarded_allow_ips": proxies or None}


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the app's engine before the server stops."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, timeout_s: float) -> None:
        super().__init__(config)
        self.runtime = app.state.runtime
        self.timeout_s = timeout_s
        self.drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain is not None or self.should_exit:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        log.info("shutdown: draining in-flight requests for up to %.0f s (SHUTDOWN_TIMEOUT_S)", self.timeout_s)
        self.drain = threading.Thread(target=self._drain_then_exit, name="shutdown-drain", daemon=True)
        self.drain.start()

    def _drain_then_exit(self) -> None:
        try:
            self.runtime.shutdown(self.timeout_s)  # new jobs refused; running ones finish or get an error
        finally:
            self.should_exit = True


def build_server(settings: Settings, app: FastAPI, **config: object) -> DrainingServer:
    options = {"host": settings.host, "port": settings.port, **server_options(settings), **config}
    return DrainingServer(uvicorn.Config(app, **options), app, settings.shutdown_timeout_s)
