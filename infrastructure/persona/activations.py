"""Generation through the engine and teacher-forced reads of the residual stream, for the persona scripts.

Teacher-forced forwards run on the caller's thread with the engine idle (the scripts wait for every
generation before reading activations). Layer outputs are taken with forward hooks on the decoder
layers, not `output_hidden_states`, whose last entry is after the final norm.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from infrastructure.engine.engine import PersonaEngine
from infrastructure.engine.job import GenerationJob, RowFinished, RowRequest, SamplingParams
from infrastructure.persona.extraction import span_means, span_token_norms
from infrastructure.steering.sites import decoder_layers
from infrastructure.steering.spec import Capture, SteeringSpec, add_op


def chat_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    """Prompt ids of one (system +) user turn, ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def generate(
    engine: PersonaEngine,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    steering: SteeringSpec | list[SteeringSpec | None] | None = None,
    captures: tuple[Capture, ...] = (),
    desc: str = "generate",
    job_rows: int = 8,
) -> list[RowFinished]:
    """Generate for every prompt (steering: one spec for all, or one per prompt), in jobs of `job_rows`
    submitted together so the engine keeps its batch full."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
    specs = steering if isinstance(steering, list) else [steering] * len(prompts)
    rows = [RowRequest(tuple(p), sampling, steering=s, captures=captures) for p, s in zip(prompts, specs)]
    size = max(1, min(job_rows, engine.max_batch_size))
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]

    async def run() -> list[list[RowFinished]]:
        bar = tqdm(total=len(rows), desc=desc, unit="row", leave=False)

        async def one(chunk: list[RowRequest]) -> list[RowFinished]:
            done = await engine.collect(GenerationJob(chunk))
            bar.update(len(chunk))
            return done

        try:
            return await asyncio.gather(*(one(c) for c in chunks))
        finally:
            bar.close()

    return [row for chunk in asyncio.run(run()) for row in chunk]


def answer_ids(finished: RowFinished, eos_ids: frozenset[int]) -> list[int]:
    """Generated ids without a trailing end-of-sequence token."""
    ids = list(finished.token_ids)
    while ids and ids[-1] in eos_ids:
        ids.pop()
    return ids


@dataclass
class SpanActivations:
    means: torch.Tensor  # [N,L,H] mean over each row's response span, per layer
    token_norms: list[torch.Tensor]  # per layer: norms of every response token (all rows)

    def median_norms(self) -> list[float]:
        return [float(n.median()) if n.numel() else 0.0 for n in self.token_norms]


@contextmanager
def _layer_taps(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Record each decoder layer's output (blocks.k.hook_resid_post) of the next forward."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for k, layer in enumerate(decoder_layers(model)):
            handles.append(layer.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, _hidden(o))))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (saves the vocabulary projection)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def response_activations(
    model: torch.nn.Module,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    batch_size: int = 16,
    desc: str = "activations",
) -> SpanActivations:
    """Teacher-forced forward over prompt+answer; per layer, the mean over the answer tokens of each row."""
    n_layers = len(decoder_layers(model))
    means, norms = [], [[] for _ in range(n_layers)]
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        p, a = prompts[i : i + batch_size], answers[i : i + batch_size]
        spans = [(len(x), len(x) + len(y)) for x, y in zip(p, a)]
        ids, mask = _right_pad([x + y for x, y in zip(p, a)], pad_id)
        with torch.inference_mode(), _layer_taps(model) as seen:
            _base(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        per_layer = [span_means(seen[k].float().cpu(), spans) for k in range(n_layers)]
        means.append(torch.stack(per_layer, dim=1))
        for k in range(n_layers):
            norms[k].append(span_token_norms(seen[k].cpu(), spans))
    return SpanActivations(torch.cat(means), [torch.cat(n) for n in norms])


@contextmanager
def steered(model: torch.nn.Module, layer: int, delta: torch.Tensor | None) -> Iterator[None]:
    """Add `delta` [H] to the output of decoder layer `layer` at every position (None: no-op)."""
    if delta is None:
        yield
        return

    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype),) + output[1:]
        return output + delta.to(output.dtype)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def answer_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    steering: tuple[int, torch.Tensor, float] | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Mean log-probability per answer token given its prompt, optionally steered by (layer, vector, scalar)."""
    delta = None if steering is None else steering[1].float() * steering[2]
    layer = 0 if steering is None else steering[0]
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        p, a = prompts[i : i + batch_size], answers[i : i + batch_size]
        ids, mask = _right_pad([x + y for x, y in zip(p, a)], pad_id)
        with torch.inference_mode(), steered(model, layer, delta):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for b, (x, y) in enumerate(zip(p, a)):
            pos = torch.arange(len(x) - 1, len(x) + len(y) - 1)  # logits at t predict token t+1
            out.append(float(logp[b, pos, torch.tensor(y)].mean()))
    return out


def steering_spec(layer: int, vector: torch.Tensor, scalar: float) -> SteeringSpec | None:
    """An ADD of scalar*vector at `layer` (None for a zero scalar: the unsteered path)."""
    return None if scalar == 0 else SteeringSpec((add_op(layer, vector, scalar),))
