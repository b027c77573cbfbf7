"""Trait listings and the status report, read from the runtime."""

from __future__ import annotations

import time
from pathlib import Path

from api.schemas.traits import StatusResponse, TraitDetail, TraitsResponse, TraitSummary
from api.services.ports import ServerState, Serving
from infrastructure.steering.hooks import our_hooks
from infrastructure.storage.traits import Trait


def trait_summary(trait: Trait) -> dict:
    """The listing fields every trait (shipped or registered) shares."""
    return {
        "name": trait.name,
        "description": trait.description,
        "layers": trait.layers,
        "default_layer": trait.default_layer,
        "model": trait.model_name,
        **_scalar_hints(trait),
    }


def _scalar_hints(trait: Trait) -> dict:
    """The recorded strength and range, when they apply to the default layer and are numbers."""
    meta = trait.metadata
    scalar, span = meta.get("recommended_scalar"), meta.get("recommended_scalar_range")
    if meta.get("recommended_layer") != trait.default_layer:
        return {}
    hints = {}
    if isinstance(scalar, int | float):
        hints["recommended_scalar"] = float(scalar)
    if isinstance(span, list) and len(span) == 2 and all(isinstance(x, int | float) for x in span):
        hints["recommended_scalar_range"] = [float(x) for x in span]
    return hints


def list_traits(runtime: Serving) -> TraitsResponse:
    runtime.require_engine()
    return TraitsResponse(traits=[TraitSummary(**trait_summary(t)) for _, t in sorted(runtime.traits.traits.items())])


def trait_detail(runtime: Serving, name: str) -> TraitDetail:
    runtime.require_engine()
    trait = runtime.traits.get(name, "name")
    return TraitDetail(
        **trait_summary(trait),
        norms=trait.norms(),
        metadata=trait.metadata,
        vector_file=Path(trait.source).name,  # file names only: answers do not reveal the server's paths
        prompts_file=trait.prompts_file.name if trait.prompts_file else None,
    )


def engine_stats(engine) -> dict:
    """The engine's counters, its decode mode and, for the paged engine, KV blocks and prefix-cache hits."""
    if engine is None:
        return {}
    kv = engine.kv_stats() if hasattr(engine, "kv_stats") else {}
    return dict(engine.stats, max_batch_size=engine.max_batch_size, decode_mode=engine.decode_mode, **kv)


def status(runtime: ServerState) -> StatusResponse:
    loaded, engine = runtime.loaded, runtime.engine
    return StatusResponse(
        status=runtime.state,
        model=loaded.model_id if loaded else None,
        weights=loaded.weights_id if loaded else None,
        source=loaded.source if loaded else None,
        devices=loaded.devices if loaded else [],
        dtype=str(loaded.dtype).removeprefix("torch.") if loaded else None,
        quantization=loaded.quantization if loaded else None,
        hidden_size=loaded.hidden_size if loaded else None,
        layers=loaded.n_layers if loaded else None,
        context_length=engine.context_len if engine else None,
        traits=sorted(runtime.traits.traits),
        traits_skipped=runtime.traits.skipped,
        persona_monitoring=runtime.axis is not None,
        persona_monitoring_detail=(
            f"assistant axis at layer {runtime.axis.layer}" if runtime.axis else runtime.axis_problem
        ),
        queue_depth=engine.queue_depth if engine else 0,
        active_requests=engine.active_requests if engine else 0,
        engine=engine_stats(engine),
        hooks_attached=len(our_hooks(loaded.model)) if loaded else 0,
        load_seconds=round(loaded.load_seconds, 2) if loaded else None,
        uptime_s=round(time.time() - runtime.started_at, 1),
        error=runtime.load_error or (engine.broken if engine else None),
    )
