"""Non-streaming answers are cancelled when their client goes away.

A streaming response notices a disconnect when a write fails, which closes its event stream and
cancels the job. A JSON answer writes nothing until the end, so without this its row would decode to
`max_tokens` (or the time budget) for nobody. `until_disconnected` runs the work next to a watcher of
the request's receive channel (after the body, the next message a server sends is `http.disconnect`)
and cancels the work when the client leaves; the cancellation closes the job's event stream, which
marks the job cancelled, and the engine drops its rows at the next step."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed request": what the access log and metrics record


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, unless the client disconnects first: then `work` is cancelled and a 499 raised
    (nobody reads it; it is what the request is logged and counted as)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise HTTPException(CLIENT_CLOSED, "the client closed the request; its generation was cancelled")
    return task.result()
