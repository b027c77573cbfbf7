"""Small helpers shared by tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx


@asynccontextmanager
async def client_for(app, timeout: float = 120, **kwargs) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to an app in-process (no socket): the one way tests build a test client."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=timeout, **kwargs) as c:
        yield c


def chat_ids(tokenizer, question: str, system: str | None = None) -> tuple[int, ...]:
    """Prompt ids of a one-question chat, as the routes render it."""
    from infrastructure.prompting import render_chat

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return render_chat(tokenizer, messages).ids


def flat_error_path(path: str) -> bool:
    """Neuronpedia's and RunPod's routes answer errors flat: `{"error": "<message>", "type", "param"}`."""
    return path.startswith(("/v1/steer/", "/v2/")) or path in ("/runsync", "/generate")


def error_of(path: str, body: dict) -> dict:
    """A 4xx/5xx body as `{type, message, param?}`, checking it has the shape its route promises."""
    if flat_error_path(path):
        assert isinstance(body.get("error"), str) and set(body) <= {"error", "type", "param"}, body
        return {"type": body["type"], "message": body["error"]} | ({"param": body["param"]} if "param" in body else {})
    assert set(body) == {"error"}, body
    return body["error"]
