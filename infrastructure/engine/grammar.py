"""Structured output: a row whose `SamplingParams.grammar` is set samples only tokens its grammar allows.

The grammar library is llguidance (Rust, no torch dependency, ~3 MB wheel, CPU-only mask computation of
tens of microseconds per token for JSON schemas). Each constrained row owns an `LLMatcher`; before every
sampling step the rows' allowed-token bitmasks are computed on the CPU (in parallel threads when several
rows are constrained), unpacked on the logits' device and applied to those rows only, so unconstrained
rows of the same batch (steered or not) are untouched. A matcher that reaches the end of its grammar stops
its row (finish reason `stop`).
"""

from __future__ import annotations

import threading
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from infrastructure.errors import InvalidRequestError

_lock = threading.Lock()
_tokenizers: dict[int, tuple[Any, llguidance.LLTokenizer]] = {}  # id(hf tokenizer) -> (it, its LLTokenizer)
_executor: llguidance.LLExecutor | None = None


def ll_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """The llguidance view of a Hugging Face tokenizer, built once per tokenizer (~0.4 s for 50k tokens)."""
    with _lock:
        entry = _tokenizers.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = (tokenizer, llguidance.hf.from_tokenizer(tokenizer))
            _tokenizers[id(tokenizer)] = entry
        return entry[1]


def json_schema_grammar(schema: dict | None) -> str:
    """A grammar for one JSON value following `schema` (None: any JSON object, OpenAI's json_object)."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"})


def check_grammar(grammar: str, tokenizer: Any, param: str) -> None:
    """Refuse (400 naming `param`) a grammar llguidance cannot compile, before the request reaches the engine."""
    error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer))  # "" when it compiles
    if error:
        raise InvalidRequestError(f"the schema cannot be enforced: {error[:500]}", param)


class Constraint:
    """One row's grammar state: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, grammar: str, tokenizer: Any) -> None:
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar)
        if self.matcher.is_error():
            raise InvalidRequestError(f"the grammar cannot be enforced: {self.matcher.get_error()}", "response_format")
        self.vocab = ll_tokenizer(tokenizer).vocab_size

    def consume(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The grammar is complete (or broke): the row stops."""
        return self.matcher.is_stopped() or self.matcher.is_error()


def _bitmasks(constraints: list[Constraint]) -> torch.Tensor:
    """[R, words] int32 allowed-token bitmasks on the CPU, one row per constraint."""
    global _executor
    bitmask = llguidance.torch.allocate_token_bitmask(len(constraints), constraints[0].vocab)
    if len(constraints) == 1:
        llguidance.torch.fill_next_token_bitmask(constraints[0].matcher, bitmask, 0)
        return bitmask
    if _executor is None:
        _executor = llguidance.LLExecutor()
    pairs = [(c.matcher, i) for i, c in enumerate(constraints)]
    llguidance.torch.fill_next_token_bitmask_par(_executor, pairs, bitmask)
    return bitmask


def _unpack(bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Packed int32 bitmasks [R, words] (bit j%32 of word j//32 = token j) -> bool [R, words*32] on `device`:
    numpy's unpackbits on the CPU; on an accelerator the packed masks travel (32x smaller) and unpack there."""
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
        return torch.from_numpy(bits).bool()
    packed = bitmask.to(device, non_blocking=True)
    return ((packed.unsqueeze(-1) >> torch.arange(32, device=device, dtype=torch.int32)) & 1).flatten(1).bool()


def constrain(logits: torch.Tensor, constraints: list[Constraint | None]) -> torch.Tensor:
    """logits [B,V] with every token a row's grammar forbids set to -inf (a copy; None rows untouched)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    allowed = _unpack(_bitmasks([constraints[i] for i in rows]), logits.device)  # [R, words*32]: token j allowed
    width = logits.shape[-1]
    if allowed.shape[-1] < width:  # ids past the tokenizer's vocabulary (padding of the LM head): never
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[-1]), value=False)
    index = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[index] = logits[index].masked_fill(~allowed[:, :width], float("-inf"))
    return out
