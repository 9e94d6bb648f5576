"""BlockManager: allocation, exact block ids, prefix caching, fork/CoW, stats, pressure."""

from __future__ import annotations

import gc
import time

import pytest

from pagedkv import BlockManager, CacheStats, MemoryPressure, OutOfBlocks


def cycle(m: BlockManager) -> None:
    m.check_integrity()
    s = m.stats()
    assert s.used_blocks + s.cached_blocks + s.free_blocks == s.num_blocks
    assert m.num_free_blocks == s.free_blocks + s.cached_blocks - s.pinned_blocks


# ---- allocation and exact block ids -------------------------------------------------------------
def test_fresh_blocks_are_handed_out_in_order():
    m = BlockManager(8, 4)
    assert m.allocate("a", list(range(10))) == 0
    assert m.block_table("a") == [0, 1, 2]
    assert m.num_tokens("a") == 10 and m.token_ids("a") == list(range(10))
    assert m.allocate("b", [100] * 5) == 0
    assert m.block_table("b") == [3, 4]
    assert m.num_free_blocks == 3
    assert m.seq_ids() == ["a", "b"] and len(m) == 2 and "a" in m and "z" not in m
    cycle(m)


def test_freed_unregistered_block_is_reused_first():
    m = BlockManager(8, 4)
    m.allocate("a", [1] * 5)  # block 0 full (registered), block 1 partial
    m.allocate("b", [2] * 2)  # block 2
    m.free("a")  # block 1 -> free stack top, block 0 -> cached
    assert m.eviction_order() == [0]
    m.allocate("c", [3])
    assert m.block_table("c") == [1]  # LIFO
    m.allocate("d", [4])
    assert m.block_table("d") == [3]
    cycle(m)


def test_without_prefix_caching_blocks_return_to_free_stack():
    m = BlockManager(8, 4, prefix_caching=False)
    m.allocate("a", list(range(12)))  # 0, 1, 2
    m.allocate("b", list(range(4)))  # 3
    assert m.block_hashes("a") == []
    m.free("a")  # tail first onto the stack: the head block comes back first
    assert m.eviction_order() == [] and m.stats().cached_blocks == 0
    assert m.allocate("c", list(range(12))) == 0  # no reuse of content
    assert m.block_table("c") == [0, 1, 2]
    assert m.lookup(list(range(12))) == 0
    m.free("b")
    m.free("c")
    assert m.num_free_blocks == 8 and m.stats().free_blocks == 8
    cycle(m)


def test_allocate_accepts_any_hashable_id_and_sequences():
    m = BlockManager(16, 4)
    m.allocate(("req", 1), (1, 2, 3))
    m.allocate(7, range(5))
    from array import array

    m.allocate(frozenset({1}), array("I", [9, 9]))
    assert m.token_ids(7) == [0, 1, 2, 3, 4]
    assert m.token_ids(frozenset({1})) == [9, 9]
    m.free(("req", 1))
    cycle(m)


def test_slot_mapping():
    m = BlockManager(8, 4)
    m.allocate("x", [1])  # 0
    m.allocate("a", list(range(6)))  # 1, 2
    m.free("x")
    m.append("a", [6, 7, 8])  # 9 tokens -> needs block 0 (reused)
    assert m.block_table("a") == [1, 2, 0]
    assert m.slot_mapping("a") == [4, 5, 6, 7, 8, 9, 10, 11, 0]
    assert m.slot_mapping("a", 3, 6) == [7, 8, 9]
    assert m.slot_mapping("a", start=8) == [0]
    assert m.slot_mapping("a", 9) == [] and m.slot_mapping("a", 2, 2) == []
    assert m.slot_mapping("a", stop=9) == m.slot_mapping("a")
    cycle(m)


def test_can_allocate_counts_free_and_evictable():
    m = BlockManager(4, 4)
    assert m.can_allocate(16) and not m.can_allocate(17) and m.can_allocate(0)
    m.allocate("a", list(range(8)))
    assert m.can_allocate(8) and not m.can_allocate(9)
    m.free("a")  # both blocks cached, still evictable
    assert m.can_allocate(16)


# ---- prefix caching ------------------------------------------------------------------------------
def test_prefix_hit_shares_full_blocks():
    m = BlockManager(16, 4)
    p = list(range(9))
    assert m.allocate("x", p) == 0  # registered at once
    assert m.allocate("y", p) == 8
    tx, ty = m.block_table("x"), m.block_table("y")
    assert ty[:2] == tx[:2] and ty[2] != tx[2]
    assert m.allocate("z", p[:8]) == 4  # at most len - 1: the last block is recomputed
    assert m.block_table("z")[0] == tx[0] and m.block_table("z")[1] not in tx
    assert m.allocate("w", p[:4]) == 0
    assert m.allocate("v", p[:5] + [99, 98, 97, 96]) == 4
    assert m.allocate("u", [99] + p[1:]) == 0  # differs in the first block
    s = m.stats()
    assert s.query_tokens == 9 + 9 + 8 + 4 + 9 + 9 and s.hit_tokens == 8 + 4 + 4
    cycle(m)


def test_prefix_hit_returns_multiple_of_block_size_at_most_len_minus_1():
    m = BlockManager(64, 4)
    base = list(range(40))
    m.allocate("base", base)
    for n in range(1, 41):
        got = m.allocate(n, base[:n])
        assert got % 4 == 0 and got <= n - 1
        assert got == ((n - 1) // 4) * 4
        assert m.lookup(base[:n]) == got
        m.free(n)
    cycle(m)


def test_cached_block_hit_after_free():
    m = BlockManager(8, 4)
    p = list(range(9))
    m.allocate("a", p)  # 0, 1, 2
    m.free("a")
    assert m.eviction_order() == [1, 0]  # tail first; block 2 was partial -> free
    assert m.stats().cached_blocks == 2 and m.stats().free_blocks == 6
    assert m.allocate("b", p) == 8
    assert m.block_table("b") == [0, 1, 2]
    assert m.eviction_order() == [] and m.stats().used_blocks == 3
    cycle(m)


def test_appended_full_blocks_are_registered():
    m = BlockManager(8, 4)
    m.allocate("a", [1, 2, 3])
    assert m.lookup([1, 2, 3, 4, 5]) == 0
    m.append("a", [4])
    assert m.lookup([1, 2, 3, 4, 5]) == 4
    m.append("a", [5, 6, 7, 8, 9])
    assert m.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]) == 8
    assert m.block_hashes("a") == m.hash_blocks([1, 2, 3, 4, 5, 6, 7, 8])
    assert m.allocate("b", [1, 2, 3, 4, 5, 6, 7, 8, 0]) == 8
    assert m.block_table("b")[:2] == m.block_table("a")[:2]
    cycle(m)


def test_duplicate_content_block_stays_anonymous():
    m = BlockManager(8, 4)
    m.allocate("a", [1, 2, 3, 4])  # block 0 registered
    m.allocate("b", [1, 2, 3, 4])  # no hit (len - 1), block 1 anonymous
    assert m.block_table("b") == [1]
    m.free("b")
    assert m.eviction_order() == []  # block 1 -> free, not cached
    assert m.stats().free_blocks == 7
    m.free("a")
    assert m.eviction_order() == [0]
    cycle(m)


def test_hits_share_one_reference_per_chain_and_last_holder_caches_it():
    m = BlockManager(32, 4)
    prompt = list(range(12))  # 3 full blocks
    m.allocate("first", prompt + [100])  # owns 0, 1, 2 (+ 3 partial)
    m.free("first")  # 0, 1, 2 cached
    assert m.allocate("a", prompt + [101]) == 12  # finds the chain 0-1-2
    assert m.allocate("b", prompt + [102]) == 12  # the same chain: one more holder
    assert m.allocate("c", prompt[:8] + [7, 7, 7, 7, 103]) == 8  # a shorter chain 0-1
    m.fork("b", "b2")  # the child holds b's chain too
    assert m._alloc.chains == {2: 3, 1: 1}
    m.check_integrity()
    for sid in ("a", "b", "b2"):
        m.free(sid)
        assert 2 not in m.eviction_order() or sid == "b2"
        m.check_integrity()
    assert m.eviction_order() == [2]  # 0 and 1 stay in use by "c"
    assert m.stats().used_blocks == 2 + 2  # c: chain 0-1 + its own 2 blocks
    m.free("c")
    assert m.eviction_order()[-2:] == [1, 0]  # tail first, as in one release
    assert m._alloc.chains == {} and m.stats().used_blocks == 0
    cycle(m)


def test_free_sends_partial_and_anonymous_blocks_to_free_stack():
    m = BlockManager(16, 4)
    m.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8])  # 0, 1 registered
    m.allocate("b", [1, 2, 3])  # block 2; no hit (needs a full block + 1)
    m.append("b", [4, 5, 6, 7, 8, 9])  # 2 fills -> anonymous (same content as 0); 3, 4
    assert m.block_table("b") == [2, 3, 4]
    m.free("b")  # 4 partial, 3 anonymous (key of 1), 2 anonymous -> all free
    assert m.eviction_order() == [] and m.stats().free_blocks == 14
    m.check_integrity()
    m.fork("a", "a2")
    m.free("a")
    m.free("a2")
    assert m.eviction_order() == [1, 0]
    cycle(m)


# ---- fork and copy-on-write ----------------------------------------------------------------------
def test_fork_shares_blocks_and_cow_on_append():
    m = BlockManager(8, 4)
    m.allocate("p", list(range(6)))  # 0, 1
    m.fork("p", "c")
    assert m.block_table("c") == [0, 1] and m.token_ids("c") == list(range(6))
    assert m.stats().used_blocks == 2
    m.append("c", [60])
    assert m.block_table("c") == [0, 2] and m.block_table("p") == [0, 1]
    assert m.take_copies() == [(1, 2)]
    assert m.take_copies() == []
    m.append("p", [70, 71])  # block 1 is no longer shared: written in place
    assert m.block_table("p") == [0, 1] and m.take_copies() == []
    assert m.stats().cow_copies == 1
    assert m.token_ids("p") == list(range(6)) + [70, 71]
    assert m.token_ids("c") == list(range(6)) + [60]
    cycle(m)


def test_cow_with_new_blocks_and_multiple_forks():
    m = BlockManager(16, 4)
    m.allocate("p", list(range(5)))  # 0, 1 (1 partial)
    m.fork("p", "c1")
    m.fork("p", "c2")
    m.append("c1", list(range(10)))  # 15 tokens: CoW 1 -> 2, plus blocks 3, 4
    assert m.block_table("c1") == [0, 2, 3, 4]
    m.append("c2", [1])  # CoW 1 -> 5 (ref of 1 was 2)
    assert m.block_table("c2") == [0, 5]
    m.append("p", [1])  # p is the only holder now: no copy
    assert m.block_table("p") == [0, 1]
    assert m.take_copies() == [(1, 2), (1, 5)]
    assert m.stats().cow_copies == 2
    cycle(m)


def test_fork_of_full_last_block_needs_no_copy():
    m = BlockManager(8, 4)
    m.allocate("p", list(range(8)))
    m.fork("p", "c")
    m.append("c", [1])
    assert m.block_table("c") == [0, 1, 2] and m.take_copies() == []
    m.free("p")
    assert m.stats().used_blocks == 3
    m.free("c")
    assert m.stats().used_blocks == 0 and m.eviction_order() == [1, 0]
    cycle(m)


def test_free_drops_references():
    m = BlockManager(8, 4)
    m.allocate("a", list(range(9)))
    m.fork("a", "b")
    m.free("a")
    assert m.stats().used_blocks == 3 and m.block_table("b") == [0, 1, 2]
    m.free("b")
    assert m.stats().used_blocks == 0 and m.stats().cached_blocks == 2
    with pytest.raises(KeyError, match="'b'"):
        m.free("b")
    cycle(m)


# ---- stats ---------------------------------------------------------------------------------------
def test_stats_exact_values():
    m = BlockManager(8, 4)
    s = m.stats()
    assert s == CacheStats(
        num_blocks=8,
        block_size=4,
        used_blocks=0,
        cached_blocks=0,
        free_blocks=8,
        pinned_blocks=0,
        num_sequences=0,
        query_tokens=0,
        hit_tokens=0,
        hit_rate=0.0,
        evictions=0,
        cow_copies=0,
        blocks_allocated=0,
        utilization=0.0,
        fragmentation=0.0,
        pressure=MemoryPressure.LOW,
    )
    m.allocate("a", list(range(10)))
    s = m.stats()
    assert (s.used_blocks, s.cached_blocks, s.free_blocks) == (3, 0, 5)
    assert (s.query_tokens, s.hit_tokens, s.hit_rate) == (10, 0, 0.0)
    assert s.blocks_allocated == 3 and s.utilization == 3 / 8
    assert s.fragmentation == pytest.approx(2 / 12)
    m.allocate("b", list(range(10)))
    s = m.stats()
    assert (s.used_blocks, s.free_blocks, s.num_sequences) == (4, 4, 2)
    assert (s.query_tokens, s.hit_tokens) == (20, 8) and s.hit_rate == pytest.approx(0.4)
    assert s.blocks_allocated == 4
    assert s.fragmentation == pytest.approx(4 / 16)
    m.fork("b", "c")  # shares b's partial block: it is counted once
    assert m.stats().fragmentation == pytest.approx(4 / 16)
    m.append("c", [1, 2])  # CoW: c's new block holds 4 of 4
    s = m.stats()
    assert s.cow_copies == 1 and s.blocks_allocated == 5 and s.used_blocks == 5
    assert s.fragmentation == pytest.approx(4 / 20)
    for sid in "abc":
        m.free(sid)
    s = m.stats()
    assert (s.used_blocks, s.cached_blocks, s.free_blocks) == (0, 3, 5)
    assert s.utilization == 0.0 and s.fragmentation == 0.0 and s.evictions == 0
    # a's block 2 and b's block 3 were partial -> free; c's CoW copy (4) filled up and was
    # registered; each release links its blocks tail first.
    assert m.eviction_order() == [4, 1, 0]
    cycle(m)


def test_fragmentation_full_blocks_is_zero():
    m = BlockManager(8, 2)
    m.allocate("a", [1, 2, 3, 4])
    assert m.stats().fragmentation == 0.0
    m.append("a", [5])
    assert m.stats().fragmentation == pytest.approx(1 / 6)


def test_repr_mentions_counts():
    m = BlockManager(8, 4)
    m.allocate("a", [1])
    assert "used=1" in repr(m) and "num_blocks=8" in repr(m)


# ---- memory pressure -----------------------------------------------------------------------------
def test_pressure_levels_and_callback_on_change_only():
    m = BlockManager(20, 1, prefix_caching=False)
    seen = []
    m.on_pressure(seen.append)
    assert m.pressure is MemoryPressure.LOW
    m.allocate("a", list(range(11)))  # 0.55
    assert seen == [] and m.pressure is MemoryPressure.LOW
    m.append("a", [1])  # 0.60
    assert seen == [MemoryPressure.MEDIUM]
    m.allocate("b", [1, 2])  # 0.70
    assert seen == [MemoryPressure.MEDIUM]
    m.fork("b", "b2")  # no new blocks
    m.append("b", [3, 4])  # 0.80
    assert seen == [MemoryPressure.MEDIUM, MemoryPressure.HIGH]
    m.allocate("c", [1, 2, 3])  # 0.95
    assert seen[-1] is MemoryPressure.CRITICAL and m.stats().pressure is MemoryPressure.CRITICAL
    m.free("c")
    m.free("b")  # b2 still holds 2 of b's blocks: 12 + 2 = 0.70
    assert seen[-2:] == [MemoryPressure.HIGH, MemoryPressure.MEDIUM]
    m.free("a")
    m.free("b2")
    assert seen == [
        MemoryPressure.MEDIUM,
        MemoryPressure.HIGH,
        MemoryPressure.CRITICAL,
        MemoryPressure.HIGH,
        MemoryPressure.MEDIUM,
        MemoryPressure.LOW,
    ]


def test_pressure_custom_watermarks_and_cached_blocks_do_not_count():
    m = BlockManager(10, 2, watermarks=(0.1, 0.2, 0.3))
    seen = []
    m.on_pressure(seen.append)
    m.allocate("a", [1, 2])
    assert seen == [MemoryPressure.MEDIUM]
    m.allocate("b", [3, 4, 5, 6, 7])  # 4 of 10 in use
    assert seen == [MemoryPressure.MEDIUM, MemoryPressure.CRITICAL]
    m.free("a")
    m.free("b")  # all cached: reclaimable, not pressure
    assert seen[-1] is MemoryPressure.LOW and m.stats().cached_blocks == 3
    assert len(seen) == 3


def test_on_pressure_registration_starts_from_current_level():
    m = BlockManager(10, 1, prefix_caching=False)
    m.allocate("a", list(range(9)))  # HIGH already
    seen = []
    m.on_pressure(seen.append)
    m.append("a", [1])  # stays HIGH? 1.0 -> CRITICAL
    assert seen == [MemoryPressure.CRITICAL]


# ---- complexity: a cached block hit leaves the queue without a scan ------------------------------
def _time_hits(policy: str, n: int) -> float:
    m = BlockManager(2 * n + 64, 2, eviction=policy)
    for i in range(n):
        m.allocate(i, [i, 7, 0])
        m.free(i)
    probes = [[i, 7, 1] for i in range(n // 2, n // 2 + 300)]  # from the middle of the queue
    gc.disable()  # a collection traverses the big per-block lists: noise, not our cost
    try:
        t0 = time.perf_counter()
        for j, p in enumerate(probes):
            m.allocate(("p", j), p)
        for j in range(len(probes)):
            m.free(("p", j))
        dt = time.perf_counter() - t0
    finally:
        gc.enable()
    assert m.stats().hit_tokens == 2 * len(probes)
    return dt


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
def test_hit_cost_does_not_grow_with_cached_blocks(policy):
    small = min(_time_hits(policy, 1_000) for _ in range(3))
    big = _time_hits(policy, 100_000)
    # A scan of the queue (50k entries per hit) would make the big pool >= 100x slower.
    assert big < 10 * small + 0.02, (small, big)


def test_out_of_blocks_is_exported():
    m = BlockManager(1, 4)
    m.allocate("a", [1])
    with pytest.raises(OutOfBlocks):
        m.allocate("b", [1])


def test_block_hashes_ranges_match_the_full_chain_also_for_anonymous_blocks():
    m = BlockManager(num_blocks=32, block_size=4)
    prompt = list(range(17))  # 4 full blocks
    m.allocate("a", prompt)
    # "b" repeats the prompt exactly: its 4th block has cached content elsewhere (a
    # hit stops one token short), so that block stays anonymous -> recomputed.
    m.allocate("b", prompt[:16])
    full = m.hash_blocks(prompt)
    for sid in ("a", "b"):
        assert m.block_hashes(sid) == full
        assert m.block_hashes(sid, 1, 3) == full[1:3]
        assert m.block_hashes(sid, 3) == full[3:]
        assert m.block_hashes(sid, 2, 99) == full[2:]
        assert m.block_hashes(sid, 4, 4) == []
    with pytest.raises(ValueError, match="start"):
        m.block_hashes("a", -1)
    m.check_integrity()


def test_cached_blocks_lists_evictable_then_pinned_never_live_ones():
    m = BlockManager(16, 4)
    m.allocate("old", [1, 2, 3, 4, 5, 6, 7, 8])
    old = m.block_table("old")
    old_hashes = m.block_hashes("old")
    m.allocate("pinned", [9, 9, 9, 9])
    pinned_block, pinned_hash = m.block_table("pinned")[0], m.block_hashes("pinned")[0]
    m.allocate("live", [5, 5, 5, 5, 6])
    m.free("old")
    m.pin([9, 9, 9, 9])
    m.free("pinned")
    hash_of = dict(zip(old, old_hashes))
    assert m.eviction_order() == old[::-1]  # tail first
    assert m.cached_blocks() == [(b, hash_of[b]) for b in old[::-1]] + [(pinned_block, pinned_hash)]
    assert sorted(m.eviction_order()) == sorted(old)  # the live sequence's block is absent
    m.unpin([9, 9, 9, 9])
    assert {b for b, _ in m.cached_blocks()} == {*old, pinned_block}
    m.check_integrity()
