"""The scripts' model configuration: the app's Settings from the environment, `--model` winning."""

from __future__ import annotations

from app.settings import Settings


def settings_for(model: str | None) -> Settings:
    """Settings from the environment, with `--model` (weights id or folder) taking precedence."""
    settings = Settings(_env_file=None)
    return settings.model_copy(update={"model_name": model}) if model else settings
