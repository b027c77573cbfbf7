"""Dependencies as aliases: routes declare what they need in their signature."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.runtime import Runtime
from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_engine(request: Request) -> PersonaEngine:
    return get_runtime(request).require_engine()


def get_settings(request: Request) -> Settings:
    return get_runtime(request).settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
EngineDep = Annotated[PersonaEngine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
