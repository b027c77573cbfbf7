"""Scheduler: token budget, chunked prefill, decode-first order, admission by KV blocks, preemption,
prefix reuse on admission (no model)."""

from __future__ import annotations

from infrastructure.engine.kv_cache import KVCacheManager, chain_hash
from infrastructure.engine.scheduler import Scheduler, Seq


def seq(i: int, n: int, keys=None) -> Seq:
    return Seq(i, list(range(100 * i, 100 * i + n)), n, prefix_keys=keys)


def run(sched: Scheduler, plan, sample: bool = True) -> None:
    """What the engine does after a step: the fed tokens are computed; rows done with input sample one."""
    for s, n in plan.items:
        s.computed += n
        if sample and s.computed == len(s.tokens):
            s.tokens.append(7)


def test_long_prompt_is_chunked_and_decoding_rows_are_served_first_every_step():
    sched = Scheduler(KVCacheManager(1000, 16), max_rows=8, token_budget=64)
    shorts = [seq(i, 10) for i in range(1, 4)]
    for s in shorts:
        sched.add(s)
    run(sched, sched.schedule())  # three 10-token prompts in one step
    long = seq(9, 200)
    sched.add(long)
    chunks = []
    while long.computed < 200:
        plan = sched.schedule()
        assert [n for s, n in plan.items if s in shorts] == [1, 1, 1]  # every short row decodes each step
        assert plan.num_tokens <= 64
        chunks.append(dict((id(s), n) for s, n in plan.items)[id(long)])
        run(sched, plan)
    assert chunks == [61, 61, 61, 17] and len(long.tokens) == 201


def test_admission_waits_for_free_blocks_and_max_rows():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = Scheduler(kv, max_rows=2, token_budget=100)
    a, b, c = seq(1, 8), seq(2, 8), seq(3, 2)
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    assert [s for s, _ in plan.items] == [a, b]  # c waits: two rows max (and no block left)
    run(sched, plan)
    sched.remove(a)
    assert kv.free_blocks == 2
    plan = sched.schedule()
    assert [s for s, _ in plan.items] == [b, c]


def test_preemption_frees_the_newest_row_and_it_is_recomputed_later():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    sched = Scheduler(kv, max_rows=4, token_budget=100)
    a, b = seq(1, 4), seq(2, 4)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())  # a, b: one full block each, one token sampled each
    run(sched, sched.schedule())  # both need a second block: only one is free, b is preempted
    assert sched.preemptions == 1 and b.computed == 0 and list(sched.waiting) == [b]
    assert len(a.tokens) == 6 and len(b.tokens) == 5  # b keeps its sampled token for the recompute
    sched.remove(a)
    plan = sched.schedule()
    assert plan.items == [(b, 5)]  # prompt + generated token, recomputed in one chunk


def test_a_running_row_preempts_itself_when_nothing_else_can_give_way():
    kv = KVCacheManager(num_blocks=1, block_size=2)
    sched = Scheduler(kv, max_rows=2, token_budget=10)
    a = seq(1, 2)
    sched.add(a)
    run(sched, sched.schedule())
    plan = sched.schedule()
    assert plan.items == [] and plan.preempted == [a] and kv.free_blocks == 1


def test_admission_reuses_published_prefix_blocks_and_counts_the_hit_rate():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    sched = Scheduler(kv, max_rows=4, token_budget=100)
    prompt = list(range(10))
    keys = [chain_hash(None, tuple(prompt[:4]), None)]
    keys.append(chain_hash(keys[0], tuple(prompt[4:8]), None))
    first = Seq(1, list(prompt), 10, prefix_keys=lambda: keys)
    sched.add(first)
    run(sched, sched.schedule())
    for i, key in enumerate(keys):
        kv.publish(1, i, key)
    second = Seq(2, list(prompt), 10, prefix_keys=lambda: keys)
    sched.add(second)
    plan = sched.schedule()
    assert (second, 2) in plan.items and second.computed == 8  # only the last two prompt tokens are fed
    assert kv.table(2)[:2] == kv.table(1)[:2]
    assert kv.stats.hit_tokens == 8 and kv.stats.queried_tokens == 16


def test_a_held_decoding_row_skips_steps_and_keeps_its_blocks():
    """Back-pressure: `holds` (the engine's "its reader is too far behind") skips a decoding row; the others
    decode, the held row's blocks stay allocated, and it decodes again once released."""
    kv = KVCacheManager(1000, 16)
    sched = Scheduler(kv, max_rows=8, token_budget=64)
    a, b = seq(1, 10), seq(2, 10)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    held = {id(a)}
    sched.holds = lambda s: id(s) in held
    blocks = list(kv.table(a.seq_id))
    for _ in range(3):
        plan = sched.schedule()
        assert [s for s, _ in plan.items] == [b]
        run(sched, plan)
    assert kv.table(a.seq_id) == blocks and len(a.tokens) == 11 and len(b.tokens) == 14
    held.clear()
    assert [s for s, _ in sched.schedule().items] == [a, b]
