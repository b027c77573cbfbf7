"""KVCacheManager: the paged KV cache's bookkeeping (no tensors): a pool of fixed-size blocks, each
sequence's block table, reference counts, and prefix reuse.

A block holds `block_size` consecutive token positions of one sequence. Full blocks can be published
under a chain hash of (the previous block's hash, the block's tokens, the steering applied to them):
the key/values of a position depend on every earlier token and on the steering those tokens saw, so
two sequences share a block only when their whole prefix up to it is equal in both. Published blocks
whose last user left stay cached (least recently freed first out) until the pool needs them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


def chain_hash(parent: bytes | None, tokens: tuple[int, ...], steering: bytes | None) -> bytes:
    """The prefix key of one full block: its predecessor's key, its token ids, its steering key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b"|".join(str(t).encode() for t in tokens))
    h.update(b"#" + (steering or b"-"))
    return h.digest()


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # of which were found (their blocks reused, not recomputed)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._hash_of: dict[int, bytes] = {}  # block -> its published key
        self._block_of: dict[bytes, int] = {}  # published key -> block
        self._cached: OrderedDict[int, None] = OrderedDict()  # published blocks nobody uses (evictable, LRU)
        self.stats = PrefixStats()

    # ---- pool state ----

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: never used, or cached but unused (evicted on demand)."""
        return len(self._free) + len(self._cached)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def slot(self, seq_id: int, position: int) -> int:
        """The pool slot (block * block_size + offset) holding a sequence's position."""
        return self._tables[seq_id][position // self.block_size] * self.block_size + position % self.block_size

    # ---- allocation ----

    def can_allocate(self, seq_id: int, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) - len(self.table(seq_id)) <= self.free_blocks

    def allocate(self, seq_id: int, n_tokens: int) -> bool:
        """Grow the sequence's table to hold `n_tokens` positions; False (and no change) when the pool
        cannot, so the scheduler can preempt or wait."""
        table = self._tables.setdefault(seq_id, [])
        need = self.blocks_for(n_tokens) - len(table)
        if need > self.free_blocks:
            if not table:
                del self._tables[seq_id]
            return False
        for _ in range(need):
            table.append(self._take())
        return True

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (finished, cancelled or preempted). Published ones stay cached."""
        for block in reversed(self._tables.pop(seq_id, [])):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently freed cached block
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    # ---- prefix reuse ----

    def lookup(self, seq_id: int, keys: list[bytes]) -> int:
        """Attach the longest run of published blocks matching `keys` (block keys of the sequence's first
        positions) to a sequence that holds no block yet; returns how many tokens they cover."""
        assert not self.table(seq_id), "prefix lookup happens before a sequence gets blocks"
        found: list[int] = []
        if self.prefix_caching:
            for key in keys:
                block = self._block_of.get(key)
                if block is None:
                    break
                found.append(block)
        for block in found:
            if self._refs[block] == 0:
                self._cached.pop(block, None)
            self._refs[block] += 1
        if found:
            self._tables[seq_id] = found
        return len(found) * self.block_size

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one admitted sequence's lookup in the hit rate (retries of a waiting one are not counted)."""
        self.stats.queried_tokens += queried_tokens
        self.stats.hit_tokens += hit_tokens

    def publish(self, seq_id: int, index: int, key: bytes) -> None:
        """Offer a sequence's full block `index` for reuse under `key` (first publisher wins)."""
        if not self.prefix_caching:
            return
        block = self._tables[seq_id][index]
        if block in self._hash_of or key in self._block_of:
            return
        self._hash_of[block] = key
        self._block_of[key] = block

    def snapshot(self) -> dict[str, float]:
        return {
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_used": self.used_blocks,
            "kv_block_size": self.block_size,
            "kv_blocks_cached": len(self._cached),
            "prefix_queried_tokens": self.stats.queried_tokens,
            "prefix_hit_tokens": self.stats.hit_tokens,
            "prefix_hit_rate": round(self.stats.hit_rate, 4),
        }
