"""What the app serves with: settings, the loaded model, the engine, traits and persona data.

Built once per process (in the lifespan, or handed in by tests) and reached through dependencies.
Loading runs off the event loop so /health can answer 503 while it happens."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from app.metrics import instrument_engine
from app.settings import Settings
from infrastructure.engine.engine import PersonaEngine
from infrastructure.errors import EngineUnavailableError, PersonaDataError
from infrastructure.faults import build_fault
from infrastructure.model_loader import LoadedModel, load_model
from infrastructure.persona.axis_data import AssistantAxis, load_axis, model_folder
from infrastructure.storage.presets import PRESETS, PresetStore, load_presets
from infrastructure.storage.traits import TraitStore, load_traits

log = logging.getLogger(__name__)


def engine_options(s: Settings) -> dict:
    """PersonaEngine's keywords from the settings."""
    return dict(
        max_batch_size=s.max_batch_size,
        max_queue=s.max_queue,
        max_model_len=s.max_model_len,
        decode=s.decode_mode,
        static_len=s.static_cache_len,
        block_size=s.kv_block_size,
        kv_cache_tokens=s.kv_cache_tokens,
        step_tokens=s.max_num_batched_tokens,
        prefix_caching=s.enable_prefix_caching,
        gpu_memory_utilization=s.gpu_memory_utilization,
        max_unread_tokens=s.max_unread_tokens,
        compile=s.compile,
        overlap=s.overlap_schedule,
        compile_cache_dir=str(s.model_cache_dir / "torch_compile"),
    )


@dataclass
class Runtime:
    settings: Settings
    loaded: LoadedModel | None = None
    engine: PersonaEngine | None = None
    traits: TraitStore = field(default_factory=TraitStore)
    presets: PresetStore = field(default_factory=PresetStore)
    axis: AssistantAxis | None = None
    axis_problem: str | None = None
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)
    owns_engine: bool = True

    @property
    def state(self) -> str:
        if self.load_error or (self.engine is not None and self.engine.broken):
            return "error"
        if self.engine is None or not self.engine.ready:
            return "loading"
        if getattr(self.engine, "stopping", False):
            return "stopping"
        return "ok"

    def require_engine(self) -> PersonaEngine:
        if self.state == "ok":
            return self.engine
        if self.state == "loading":
            raise EngineUnavailableError("the model is still loading; retry shortly")
        if self.state == "stopping":
            raise EngineUnavailableError("the server is shutting down")
        raise EngineUnavailableError(f"the model failed: {self.load_error or self.engine.broken}")

    def attach(self, loaded: LoadedModel, engine: PersonaEngine) -> None:
        """Load traits and persona data for this model, then expose the engine."""
        ids = {loaded.model_id, loaded.weights_id}
        s = self.settings
        self.traits = load_traits(s.vectors_dir, s.prompts_dir, ids, loaded.hidden_size, loaded.n_layers)
        self.presets = load_presets(s.vectors_dir / PRESETS)
        self.axis, self.axis_problem = None, None
        if not s.persona_monitoring:
            self.axis_problem = "persona monitoring is off (PERSONA_MONITORING=false)"
        else:
            try:
                folder = model_folder(s.persona_data_path, loaded.model_id)
                self.axis = load_axis(folder, loaded.hidden_size, loaded.n_layers)
            except PersonaDataError as exc:  # shown by /status: the setting's name, not the server's path
                self.axis_problem = exc.message.replace(str(s.persona_data_path), "PERSONA_DATA_PATH")
        if s.fault_injection:
            engine.fault = build_fault(s.fault_injection)
        instrument_engine(engine)
        self.loaded = loaded
        self.engine = engine

    def load(self) -> None:
        """Load the configured model and start a warmed engine (blocking; run it in a thread)."""
        try:
            if self.settings.tensor_parallel_size > 1:  # rank 0 of N processes, each a shard of every layer
                from infrastructure.engine.tensor_parallel import launch_tensor_parallel

                loaded, engine = launch_tensor_parallel(self.settings, **engine_options(self.settings))
                self.engine = engine  # stopped by shutdown even if it never becomes ready (its workers with it)
            else:
                loaded = load_model(self.settings)
                engine = PersonaEngine(loaded, **engine_options(self.settings))
            engine.start()
            if not engine.wait_ready():
                raise RuntimeError(engine.broken or "engine did not start")
            self.attach(loaded, engine)
        except Exception as exc:  # reported by /health and /status
            if (
                self.engine is not None and not self.engine.ready
            ):  # a tensor-parallel start that failed: end its workers
                self.engine.stop(5)
            self.load_error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            log.exception("model load failed")

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="model-loader", daemon=True)
        thread.start()
        return thread

    def shutdown(self, timeout: float) -> None:
        if self.engine is not None and self.owns_engine:
            self.engine.stop(timeout)
