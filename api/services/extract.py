"""Vector extraction as a service: validate the examples, run the contrastive extraction through the engine
(prefill-only jobs, no decoding), register the result, and answer with it and its validation numbers.

Everything that can be refused is refused before any model work (bad layers, over-long texts, a taken
name), so a streamed request fails with a plain 4xx rather than inside the stream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from api.schemas.extract import ExtractRequest, ExtractResponse, ExtractValidation
from api.schemas.vectors import RegistryOptions
from api.services.ports import Serving
from api.services.vectors import check_name_free, register_computed, vector_detail
from infrastructure.errors import HookOutOfRangeError, InvalidRequestError, PersonaError, TokenLimitError
from infrastructure.persona.contrastive_run import (
    ContrastiveExamples,
    ContrastiveResult,
    extract,
    pair_examples,
    text_examples,
)

log = logging.getLogger(__name__)

MAX_SEQUENCE_TOKENS = 384  # prompt + answer of one example


def _options(body: ExtractRequest) -> RegistryOptions:
    return RegistryOptions(name=body.name, description=body.description, persist=body.persist, overwrite=body.overwrite)


def _examples(runtime: Serving, body: ExtractRequest) -> ContrastiveExamples:
    tokenizer = runtime.loaded.tokenizer
    if body.pairs is not None:
        examples = pair_examples(tokenizer, [(p.question, p.positive, p.negative) for p in body.pairs])
        params = [f"pairs.{i}" for i in range(len(body.pairs))]
        sides = {"positive": params, "negative": params}
    else:
        examples = text_examples(tokenizer, body.positive, body.negative)
        sides = {side: [f"{side}.{i}" for i in range(len(getattr(body, side)))] for side in ("positive", "negative")}
    for side, rows in (("positive", examples.positive), ("negative", examples.negative)):
        for param, (prompt, answer) in zip(sides[side], rows):
            if not answer:
                raise InvalidRequestError("the text has no tokens", f"{param}.{side}" if body.pairs else param)
            if len(prompt) + len(answer) > MAX_SEQUENCE_TOKENS:
                raise TokenLimitError(
                    f"{len(prompt) + len(answer)} tokens with the chat prompt; at most {MAX_SEQUENCE_TOKENS}", param
                )
    return examples


def prepare(runtime: Serving, body: ExtractRequest) -> tuple[ContrastiveExamples, list[int] | None]:
    """The tokenised examples and candidate layers; raises the request's 4xx before any model work."""
    runtime.require_engine()
    n_layers = runtime.loaded.n_layers
    for layer in body.layers or []:
        if not 0 <= layer < n_layers:
            raise HookOutOfRangeError(f"layer {layer} is out of range: the model has 0..{n_layers - 1}", "layers")
    check_name_free(runtime, _options(body))
    return _examples(runtime, body), sorted(set(body.layers)) if body.layers else None


def _register(runtime: Serving, body: ExtractRequest, result: ContrastiveResult) -> ExtractResponse:
    meta = {"format": "extracted", **result.metadata()}
    meta["residual_median_norms"] = {str(k): round(r, 3) for k, r in enumerate(result.resid_medians)}
    vectors = {k: result.vectors[k].clone() for k in range(result.vectors.shape[0])}
    register_computed(runtime, _options(body), vectors, meta)
    layer = result.layer
    return ExtractResponse(
        vector=vector_detail(runtime, body.name, values=True, layer=layer),
        recommended_layer=layer,
        recommended_scalar=meta["recommended_scalar"],
        recommended_scalar_range=meta["recommended_scalar_range"],
        validation=ExtractValidation(**result.validation.as_metadata()),
        split=result.split,
        seconds=round(result.seconds, 2),
    )


async def run_extract(runtime: Serving, body: ExtractRequest) -> ExtractResponse:
    examples, layers = prepare(runtime, body)
    result = await extract(runtime.require_engine(), examples, layers=layers)
    return _register(runtime, body, result)


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def stream_extract(runtime: Serving, body: ExtractRequest) -> AsyncIterator[bytes]:
    """Validate now (4xx before the stream), then SSE: `progress` per engine job, one `result` or `error`."""
    examples, layers = prepare(runtime, body)
    engine = runtime.require_engine()

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[dict] = asyncio.Queue()

        def progress(stage: str, done: int, total: int) -> None:
            queue.put_nowait({"stage": stage, "done": done, "total": total})

        task = asyncio.create_task(extract(engine, examples, layers=layers, progress=progress))
        try:
            while not task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield _event("progress", getter.result())
                else:
                    getter.cancel()
            yield _event("result", _register(runtime, body, task.result()).model_dump())
        except PersonaError as exc:
            yield _event("error", {"error": {"type": exc.type, "message": exc.message, "param": exc.param}})
        except Exception:
            log.exception("vector extraction failed")
            yield _event("error", {"error": {"type": "internal_error", "message": "internal server error"}})
        finally:
            task.cancel()  # a client that went away cancels the engine job it was waiting on

    return events()
