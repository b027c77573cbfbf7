"""Seed 002's generate and baseline: one user turn, optional trait steering, one row."""

from __future__ import annotations

from api.schemas.common import Usage
from api.schemas.generate import AppliedTrait, BaselineRequest, GenerateRequest, GenerateResponse
from api.services.checks import check_new_tokens, render_prompt
from api.services.ports import Serving
from api.services.presets import preset_named, preset_steering, resolve_refs, steering_refs
from infrastructure.engine.job import GenerationJob, RowRequest, SamplingParams
from infrastructure.steering.resolve import VectorRef


def sampling_from(runtime: Serving, body: BaselineRequest | GenerateRequest) -> SamplingParams:
    s = runtime.settings
    return SamplingParams(
        max_new_tokens=check_new_tokens(runtime, body.max_tokens or s.max_tokens, "max_tokens"),
        temperature=s.temperature if body.temperature is None else body.temperature,
        top_p=s.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
    )


async def run_generate(runtime: Serving, body: BaselineRequest | GenerateRequest) -> GenerateResponse:
    engine = runtime.require_engine()
    applied: list[AppliedTrait] = []
    steering = None
    if isinstance(body, GenerateRequest):
        steers = body.steers()
        prefix = "traits" if body.traits is not None else None
        refs = [
            VectorRef(
                param=f"{prefix}.{i}" if prefix else "", scale=t.scalar, trait=t.trait, hook=t.layer, hook_field="layer"
            )
            for i, t in enumerate(steers)
        ]
        if body.preset is not None:  # after the traits, so `applied` pairs each trait with its op
            refs += steering_refs(preset_steering(preset_named(runtime, body.preset)), "preset.steering.vectors")
        steering = resolve_refs(runtime, refs)
        ops = steering.ops if steering is not None else ()
        applied = [AppliedTrait(trait=t.trait, scalar=t.scalar, layer=op.site) for t, op in zip(steers, ops)]
    prompt = await render_prompt(runtime, [{"role": "user", "content": body.prompt}])
    job = GenerationJob(
        [RowRequest(prompt.ids, sampling_from(runtime, body), steering)], timeout_s=runtime.settings.request_timeout_s
    )
    [done] = await engine.collect(job)
    single = applied[0] if len(applied) == 1 and isinstance(body, GenerateRequest) and body.traits is None else None
    return GenerateResponse(
        text=done.text,
        trait=single.trait if single else None,
        scalar=single.scalar if single else None,
        layer=single.layer if single else None,
        traits=applied,
        preset=body.preset if isinstance(body, GenerateRequest) else None,
        model=runtime.loaded.model_id,
        finish_reason=done.finish_reason,
        usage=Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
        ),
    )
