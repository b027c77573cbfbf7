"""Dependencies as aliases: routes declare what they need in their signature."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.runtime import Runtime
from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine

# `async def`: FastAPI runs a plain `def` dependency on a worker thread, a thread hop (and, under load, a wait for
# the GIL) per request for an attribute lookup; these never block, so they run on the event loop.


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_engine(request: Request) -> PersonaEngine:
    return request.app.state.runtime.require_engine()


async def get_settings(request: Request) -> Settings:
    return request.app.state.runtime.settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
EngineDep = Annotated[PersonaEngine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
