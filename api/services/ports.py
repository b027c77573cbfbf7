"""What the request services need from the running server, as narrow interfaces (typing.Protocol).

The app's `Runtime` provides them structurally (it is never imported by a service), so a route passes
its runtime and a service sees only these members: no loading, attaching or shutting down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from app.settings import Settings
from infrastructure.engine.job import Event, GenerationJob, RowFinished
from infrastructure.model_loader import LoadedModel
from infrastructure.persona.axis_data import AssistantAxis
from infrastructure.storage.presets import PresetStore
from infrastructure.storage.traits import TraitStore


class EngineClient(Protocol):
    """The engine as a request sees it: submit a job and read its events."""

    @property
    def tokenizer(self) -> Any: ...

    def submit(self, job: GenerationJob) -> AsyncIterator[Event]: ...

    async def collect(self, job: GenerationJob) -> list[RowFinished]: ...

    def check_prompt(self, n_tokens: int, param: str = "prompt") -> None: ...


class Serving(Protocol):
    """What a request reads: the settings, the loaded model's identity and shape, the traits, the
    assistant axis, and the engine once it is ready (`require_engine` raises the 503 otherwise)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def loaded(self) -> LoadedModel | None: ...

    @property
    def traits(self) -> TraitStore: ...

    @property
    def presets(self) -> PresetStore: ...

    @property
    def axis(self) -> AssistantAxis | None: ...

    @property
    def axis_problem(self) -> str | None: ...

    @property
    def started_at(self) -> float: ...

    def require_engine(self) -> EngineClient: ...


class EngineStats(Protocol):
    """The engine's counters that /status reports."""

    context_len: int
    max_batch_size: int
    stats: dict
    broken: str | None

    @property
    def queue_depth(self) -> int: ...

    @property
    def active_requests(self) -> int: ...


class ServerState(Serving, Protocol):
    """/status also reports how the server is doing: loading, ok, stopping or error, and why."""

    @property
    def state(self) -> str: ...

    @property
    def load_error(self) -> str | None: ...

    @property
    def engine(self) -> EngineStats | None: ...
