"""KVCacheManager: block pool, block tables, reference counts and prefix reuse (no model, no tensors)."""

from __future__ import annotations

import pytest

from infrastructure.engine.kv_cache import KVCacheManager, chain_hash


def keys(tokens: list[int], block: int, steering: bytes | None = None) -> list[bytes]:
    out: list[bytes] = []
    for i in range(len(tokens) // block):
        out.append(chain_hash(out[-1] if out else None, tuple(tokens[i * block : (i + 1) * block]), steering))
    return out


def test_allocation_grows_tables_and_refuses_without_change_when_the_pool_is_short():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate(1, 5) and kv.table(1) == [0, 1]
    assert kv.allocate(1, 8) and kv.table(1) == [0, 1]  # still two blocks
    assert kv.allocate(2, 4) and kv.free_blocks == 1
    assert not kv.allocate(2, 12) and kv.table(2) == [2]  # needs 2 more, 1 free: nothing taken
    assert not kv.allocate(3, 9) and kv.table(3) == []
    assert kv.slot(1, 5) == 1 * 4 + 1 and kv.slot(2, 3) == 2 * 4 + 3
    kv.free(1)
    assert kv.free_blocks == 3 and kv.used_blocks == 1 and kv.table(1) == []


def test_published_blocks_are_shared_by_equal_prefixes_and_survive_their_owner_until_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    prompt = [5, 6, 7, 8, 9]
    k = keys(prompt, 2)
    assert kv.lookup(1, k) == 0
    assert kv.allocate(1, 5)
    for i, key in enumerate(k):
        kv.publish(1, i, key)
    assert kv.lookup(2, k) == 4 and kv.table(2) == kv.table(1)[:2]  # shared, reference count 2
    kv.free(1)
    assert kv.used_blocks == 2  # still used by sequence 2
    kv.free(2)
    assert kv.used_blocks == 0 and kv.snapshot()["kv_blocks_cached"] == 2
    assert kv.lookup(3, k) == 4  # cached blocks outlive their users
    kv.free(3)
    assert kv.allocate(4, 8)  # needs every block: the cached ones are evicted
    assert kv.lookup(5, k) == 0


def test_a_different_token_or_steering_breaks_the_chain_from_that_block_on():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    base = [1, 2, 3, 4, 5, 6]
    assert kv.allocate(1, 6)
    for i, key in enumerate(keys(base, 2)):
        kv.publish(1, i, key)
    assert kv.lookup(2, keys([1, 2, 3, 9, 5, 6], 2)) == 2  # second block differs: only the first is reused
    assert kv.lookup(3, keys(base, 2, steering=b"vector")) == 0  # same tokens, other steering
    assert chain_hash(None, (1, 2), None) != chain_hash(None, (12,), None)


def test_prefix_caching_off_never_hits_and_stats_count_admitted_lookups():
    kv = KVCacheManager(num_blocks=4, block_size=2, prefix_caching=False)
    assert kv.allocate(1, 4)
    kv.publish(1, 0, b"k")
    assert kv.lookup(2, [b"k"]) == 0
    kv.record_lookup(10, 4)
    assert kv.stats.hit_rate == pytest.approx(0.4)
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=0, block_size=16)
