"""Bounded walk over a GGUF file's header before any GGUF library touches it.

`gguf.GGUFReader` trusts the counts a file declares: a 2,400-byte upload declaring a metadata array
of 10**6 elements made it loop (and allocate) per element for seconds, and a uint64 count can make
it loop for ever. Every count and size here is checked against an absolute cap and against the
bytes actually left in the file *before* it is acted on, so the walk is O(file size) and a file that
passes is one the reader can parse in bounded time. The caps are far above what a control vector
(a few string/int fields, one 1-D float tensor per layer) ever needs."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from infrastructure.errors import InvalidRequestError

MAX_KV = 256  # metadata fields
MAX_TENSORS = 1024  # one per layer
MAX_STRING = 65536  # bytes of one string
MAX_ARRAY = 4096  # elements of one metadata array
MAX_ARRAY_TOTAL = 16384  # elements over all metadata arrays
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 24  # floats in one tensor

_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9
_FLOAT_TENSORS = {0: 4, 1: 2}  # GGML F32, F16 -> bytes per element


class _Bad(Exception):
    pass


@dataclass
class _Cursor:
    data: bytes
    pos: int = 0

    def take(self, n: int) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            raise _Bad(f"truncated at byte {self.pos} (needs {n} more bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def count(self, what: str, cap: int, item_bytes: int) -> int:
        """A declared count, refused if over its cap or if its items cannot fit in the bytes left."""
        n = self.u64()
        if n > cap:
            raise _Bad(f"{what} declares {n} items; at most {cap}")
        if n * item_bytes > len(self.data) - self.pos:
            raise _Bad(f"{what} declares {n} items but only {len(self.data) - self.pos} bytes remain")
        return n

    def string(self, what: str) -> bytes:
        return self.take(self.count(what, MAX_STRING, 1))


def _skip_value(cur: _Cursor, vtype: int, key: str, budget: list[int]) -> int | None:
    """Skip one metadata value; returns it when it is an unsigned integer (for general.alignment)."""
    if vtype in _SCALARS:
        raw = cur.take(_SCALARS[vtype])
        return int.from_bytes(raw, "little") if vtype in (4, 10) else None
    if vtype == _STRING:
        cur.string(f"string {key!r}")
        return None
    if vtype == _ARRAY:
        item = cur.u32()
        if item not in _SCALARS and item != _STRING:
            raise _Bad(f"array {key!r} has items of type {item} (nested arrays and unknown types are refused)")
        n = cur.count(f"array {key!r}", MAX_ARRAY, _SCALARS.get(item, 8))
        budget[0] -= n
        if budget[0] < 0:
            raise _Bad(f"metadata arrays hold more than {MAX_ARRAY_TOTAL} elements in all")
        if item == _STRING:
            for _ in range(n):
                cur.string(f"array {key!r} item")
        else:
            cur.take(n * _SCALARS[item])
        return None
    raise _Bad(f"metadata {key!r} has unknown type {vtype}")


def _tensor_infos(cur: _Cursor, n: int) -> list[tuple[str, int, int]]:
    """(name, bytes, offset) of each tensor; only 1..4-D F32/F16 tensors of bounded size."""
    infos = []
    for _ in range(n):
        name = cur.string("tensor name").decode("utf-8", "replace")
        n_dims = cur.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name[:60]!r} has {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= cur.u64()
            if elements > MAX_ELEMENTS:
                raise _Bad(f"tensor {name[:60]!r} is larger than {MAX_ELEMENTS} elements")
        ttype = cur.u32()
        if ttype not in _FLOAT_TENSORS:
            raise _Bad(f"tensor {name[:60]!r} has type {ttype}; expected F32 or F16")
        infos.append((name, elements * _FLOAT_TENSORS[ttype], cur.u64()))
    return infos


def check_gguf_layout(data: bytes, param: str = "file") -> None:
    """Refuse (InvalidRequestError naming `param`) a GGUF file whose declared counts or sizes are
    out of bounds or do not fit in the file; O(len(data)) whatever the file declares."""
    cur = _Cursor(data)
    try:
        if cur.take(4) != b"GGUF":
            raise _Bad("no GGUF magic")
        version = cur.u32()
        if version not in (2, 3):
            raise _Bad(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors = cur.count("tensor table", MAX_TENSORS, 8 + 4 + 8 + 4 + 8)
        n_kv = cur.count("metadata table", MAX_KV, 8 + 4)
        alignment, budget = 32, [MAX_ARRAY_TOTAL]
        for _ in range(n_kv):
            key = cur.string("metadata key").decode("utf-8", "replace")[:80]
            value = _skip_value(cur, cur.u32(), key, budget)
            if key == "general.alignment" and value is not None:
                alignment = value
        if not 1 <= alignment <= 4096 or alignment & (alignment - 1):
            raise _Bad(f"general.alignment {alignment} is not a power of two up to 4096")
        infos = _tensor_infos(cur, n_tensors)
        start = -(-cur.pos // alignment) * alignment
        for name, size, offset in infos:
            if offset > len(data) or start + offset + size > len(data):
                raise _Bad(f"tensor {name[:60]!r} lies beyond the end of the file")
    except _Bad as exc:
        raise InvalidRequestError(f"unreadable GGUF file: {exc}", param) from None
