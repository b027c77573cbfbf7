"""A row of the paged engine: the engine Row plus what the scheduler and the prefix cache need (its
scheduler sequence, the steering mask bit of every position, and the prefix keys of its full blocks)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from infrastructure.engine.kv_cache import chain_hash
from infrastructure.engine.rows import Row, capture_slots
from infrastructure.engine.scheduler import Seq
from infrastructure.steering.spec import SteeringSpec


def steering_key(spec: SteeringSpec | None) -> bytes | None:
    """A digest of what a row's steering does where it applies (sites, methods, strengths, vectors)."""
    if spec is None or spec.is_empty():
        return None
    h = hashlib.blake2b(digest_size=16)
    for op in spec.ops:
        h.update(f"{op.site}:{op.method}:{getattr(op, 'tau', None)}".encode())
        h.update(op.vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.digest()


@dataclass(eq=False)
class PagedRow(Row):
    seq: Seq | None = None
    steer_bits: list[bool] = field(default_factory=list)  # one per position fed or to feed
    steer_key: bytes | None = None
    keys: list[bytes] = field(default_factory=list)  # prefix keys of full blocks, in order
    published: int = 0  # full blocks offered to the prefix cache
    published_for: int = 0  # ... since this many preemptions
    captured_upto: int = 0  # positions whose captures were recorded (a recompute skips them)
    slot: int | None = None  # block-table slot in the runner while scheduled
    special_ids: frozenset[int] = frozenset()

    def block_key(self, index: int, block_size: int) -> bytes:
        """The prefix key of full block `index` (computed in order and kept)."""
        while len(self.keys) <= index:
            i = len(self.keys)
            lo, hi = i * block_size, (i + 1) * block_size
            bits = self.steer_bits[lo:hi]
            key = self.steer_key + bytes(bits) if self.steer_key is not None and any(bits) else None
            self.keys.append(chain_hash(self.keys[-1] if self.keys else None, tuple(self.seq.tokens[lo:hi]), key))
        return self.keys[index]

    def prompt_keys(self, block_size: int) -> list[bytes]:
        """Keys of the prompt's full blocks a lookup may reuse (the last prompt token is always computed)."""
        return [self.block_key(i, block_size) for i in range((self.prompt_len - 1) // block_size)]

    def push(self, token: int) -> None:
        """A sampled token becomes the row's next input."""
        self.seq.tokens.append(token)
        self.steer_bits.extend(self.steer_mask([token], False, self.special_ids))

    def fill(self, token: int) -> None:
        """The sampled token replaces the placeholder a chained step left for it (overlap.py), with its real
        steering bit."""
        self.seq.tokens[-1] = token
        self.steer_bits[-1] = self.steer_mask([token], False, self.special_ids)[0]

    def bit_needs_token(self) -> bool:
        """Whether this row's steering bit at a generated position depends on the token (special tokens
        unsteered): a chained step computes it on the device (overlap.Feed)."""
        spec = self.request.steering
        return bool(self.steer_mask([0], False, frozenset())[0]) and not spec.steer_special_tokens

    def record_span(self, captured: dict[tuple[int, int], torch.Tensor], start: int, position: int, n: int) -> None:
        """Keep the captures of this row's positions [position, position+n) (flat step indices from start)."""
        skip = max(0, self.captured_upto - position)
        if skip >= n or not self.request.captures:
            return
        for name, site, slot in capture_slots(self.request):
            values = captured[(site, slot)][start + skip : start + n].tolist()
            self.captured.setdefault(name, []).extend(values)
        self.captured_upto = position + n
