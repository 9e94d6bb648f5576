"""Eviction: exact order for LRU / FIFO / LFU, TTL with a fake clock, pinning, on_evict."""

from __future__ import annotations

import dataclasses
import random

import pytest

from pagedkv import BlockManager, OutOfBlocks
from pagedkv.manager.eviction import BlockMeta, LRUPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(policy: str, num_blocks: int = 6, block_size: int = 2, **kw):
    evicted: list[tuple[int, bytes]] = []
    m = BlockManager(
        num_blocks,
        block_size,
        eviction=policy,
        on_evict=lambda b, h: evicted.append((b, h)),
        **kw,
    )
    return m, evicted


def _release_two(m: BlockManager) -> None:
    m.allocate("a", [1, 2, 3, 4])  # blocks 0, 1 (registered 1st, 2nd)
    m.allocate("b", [5, 6, 7, 8])  # blocks 2, 3 (registered 3rd, 4th)
    m.free("a")
    m.free("b")


# ---- exact order per policy ---------------------------------------------------------------------
def test_lru_exact_order_and_victims():
    m, evicted = make("lru")
    _release_two(m)
    assert m.eviction_order() == [1, 0, 3, 2]  # each sequence tail first
    assert m.allocate("c", [1, 2, 9]) == 2  # hits block 0
    assert m.block_table("c") == [0, 4]
    assert m.eviction_order() == [1, 3, 2]
    m.free("c")  # block 4 partial -> free stack; block 0 most recently used
    assert m.eviction_order() == [1, 3, 2, 0]
    assert m.allocate("d", [20, 21, 22, 23, 24, 25]) == 0  # 3 blocks: 4, 5, then evict 1
    assert m.block_table("d") == [4, 5, 1]
    assert evicted == [(1, m.hash_blocks([1, 2, 3, 4])[1])]
    assert m.eviction_order() == [3, 2, 0]
    assert m.lookup([1, 2, 3, 4, 0]) == 2  # block 0 still cached, block 1 gone
    m.append("d", [26])  # evicts 3, then nothing else needed
    assert m.block_table("d") == [4, 5, 1, 3] and [b for b, _ in evicted] == [1, 3]
    assert m.eviction_order() == [2, 0]
    s = m.stats()
    assert s.evictions == 2 and s.blocks_allocated == 2 + 2 + 1 + 3 + 1
    m.check_integrity()


def test_fifo_exact_order_and_victims():
    m, evicted = make("fifo")
    _release_two(m)
    assert m.eviction_order() == [0, 1, 2, 3]  # registration order
    m.allocate("c", [1, 2, 9])
    m.free("c")  # a hit does not refresh a FIFO block
    assert m.eviction_order() == [0, 1, 2, 3]
    m.allocate("d", [20, 21, 22, 23, 24, 25])  # takes 4, 5, evicts 0 (oldest registered)
    assert m.block_table("d") == [4, 5, 0]
    assert [b for b, _ in evicted] == [0]
    assert evicted[0][1] == m.hash_blocks([1, 2])[0]
    # d's blocks were registered after a's and b's: they go last.
    m.free("d")
    assert m.eviction_order() == [1, 2, 3, 4, 5, 0]
    assert m.lookup([1, 2, 3, 4, 0]) == 0  # the chain starts at the evicted block
    m.check_integrity()


def test_lfu_exact_order_ties_by_lru():
    m, evicted = make("lfu")
    _release_two(m)
    assert m.eviction_order() == [1, 0, 3, 2]  # all 0 hits: LRU order
    for sid in ("c1", "c2"):  # two hits on block 0
        assert m.allocate(sid, [1, 2, 9]) == 2
        m.free(sid)
    assert m.allocate("d", [5, 6, 9]) == 2  # one hit on block 2
    m.free("d")
    assert m.eviction_order() == [1, 3, 2, 0]  # LRU would be [1, 3, 0, 2]
    m.allocate("e", list(range(100, 106)))  # 3 blocks: free 4 + 5 ... then evict 1
    assert [b for b, _ in evicted] == [1]
    m.allocate("f", [50, 51, 52])  # 2 blocks: evict 3, 2
    assert [b for b, _ in evicted] == [1, 3, 2]
    assert m.eviction_order() == [0]
    m.check_integrity()


def test_lfu_hits_reset_when_block_is_reregistered():
    m, evicted = make("lfu", num_blocks=2)
    m.allocate("a", [1, 2, 3])  # 0 registered, 1 partial
    m.free("a")
    m.allocate("b", [1, 2, 3])  # hit: hits[0] = 1
    m.free("b")
    m.allocate("c", [7, 8, 9, 9])  # takes 1, evicts 0
    assert [b for b, _ in evicted] == [0]
    m.free("c")  # 1 re-registered as [7, 8], 0 as [9, 9]; both 0 hits again -> LRU
    assert m.eviction_order() == [0, 1]  # with block 0's old hit kept it would be [1, 0]


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
def test_in_use_blocks_are_never_evicted(policy):
    m, evicted = make(policy, num_blocks=4)
    m.allocate("keep", [1, 2, 3, 4])  # 0, 1 in use
    m.allocate("tmp", [5, 6, 7, 8])  # 2, 3
    m.free("tmp")
    m.allocate("x", [9, 9, 9, 9])  # evicts 2 and 3 only
    assert sorted(b for b, _ in evicted) == [2, 3]
    with pytest.raises(OutOfBlocks):
        m.append("x", [1])
    assert m.block_table("keep") == [0, 1] and m.lookup([1, 2, 3, 4, 5]) == 4
    m.check_integrity()


def test_policy_name_is_case_insensitive():
    assert BlockManager(4, 2, eviction="LRU").eviction == "lru"
    assert BlockManager(4, 2, eviction="Fifo").eviction == "fifo"


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
def test_eviction_order_is_the_victim_order(policy):
    m, evicted = make(policy, num_blocks=16, block_size=1)
    for i in range(4):
        m.allocate(i, [10 * i, 10 * i + 1, 10 * i + 2])
    for i in (2, 0, 3):
        m.free(i)
    m.allocate("h", [0, 1, 5])  # hits 2 blocks of seq 0
    m.free("h")
    expected = m.eviction_order()
    assert m.stats().free_blocks == 3 and m.num_free_blocks == 3 + len(expected)
    m.allocate("big", list(range(1000, 1000 + m.num_free_blocks)))  # free, then every cached
    assert [b for b, _ in evicted] == expected
    assert m.eviction_order() == []


# ---- TTL -----------------------------------------------------------------------------------------
def test_ttl_expired_blocks_are_not_matched_and_lookup_changes_nothing():
    clock = FakeClock()
    m, evicted = make("lru", num_blocks=8, ttl_seconds=10, clock=clock)
    m.allocate("a", [1, 2, 3])  # block 0 registered, 1 partial
    m.free("a")  # 0 cached at t=0
    clock.now = 5.0
    m.allocate("b", [4, 5, 6])  # LIFO: 1, then 2
    assert m.block_table("b") == [1, 2]
    m.free("b")  # 1 cached at t=5
    clock.now = 10.0  # exactly ttl: not yet "older than"
    assert m.lookup([1, 2, 9]) == 2
    clock.now = 10.5
    before = (m.eviction_order(), m.stats(), m.num_free_blocks)
    assert m.lookup([1, 2, 9]) == 0 and m.lookup([4, 5, 9]) == 2
    assert (m.eviction_order(), m.stats(), m.num_free_blocks) == before  # lookup is pure
    assert m.allocate("c", [1, 2, 9]) == 0  # expired: recomputed in a fresh block
    assert m.stats().evictions == 1 and evicted == []  # expiry is not an on_evict
    assert 0 not in m.eviction_order() and m.eviction_order() == [1]
    assert m.lookup([1, 2, 9]) == 2  # c's copy is registered
    m.check_integrity()


@pytest.mark.parametrize("policy", ["fifo", "lfu", "lru"])
@pytest.mark.parametrize("op", ["allocate", "append"])
def test_ttl_expired_blocks_are_dropped_first(policy, op):
    clock = FakeClock()
    m, evicted = make(policy, num_blocks=3, ttl_seconds=10, clock=clock)
    m.allocate("a", [1, 2])  # 0, registered 1st
    m.allocate("b", [3, 4])  # 1, registered 2nd
    m.allocate("live", [9, 9])  # 2
    m.free("b")  # 1 cached at t=0
    clock.now = 20.0
    m.free("a")  # 0 cached at t=20: fresh
    clock.now = 25.0  # block 1 is idle 25 s > 10 s
    if op == "allocate":
        m.allocate("c", [7, 7])
        assert m.block_table("c") == [1]
    else:
        m.append("live", [1])
        assert m.block_table("live") == [2, 1]
    assert evicted == [] and m.stats().evictions == 1
    assert m.lookup([1, 2, 0]) == 2  # the fresh block survived
    m.check_integrity()


def test_ttl_out_of_blocks_changes_nothing():
    clock = FakeClock()
    m, _ = make("lru", num_blocks=3, ttl_seconds=10, clock=clock)
    m.allocate("a", [1, 2, 3, 4])
    m.free("a")
    m.allocate("keep", [5, 6])
    clock.now = 100.0
    before = (m.eviction_order(), m.stats(), m.num_free_blocks)
    with pytest.raises(OutOfBlocks):
        m.allocate("big", list(range(20, 28)))
    after = m.stats()
    assert after.allocation_failures == before[1].allocation_failures + 1  # the one change
    after = dataclasses.replace(after, allocation_failures=before[1].allocation_failures)
    assert (m.eviction_order(), after, m.num_free_blocks) == before
    m.check_integrity()


def test_ttl_refreshed_by_use_and_pinned_blocks_do_not_expire():
    clock = FakeClock()
    m, _ = make("lru", num_blocks=8, ttl_seconds=10, clock=clock)
    m.allocate("a", [1, 2, 3, 4, 5])
    m.free("a")
    m.pin([1, 2])
    clock.now = 8.0
    assert m.allocate("b", [1, 2, 3, 4, 5]) == 4
    clock.now = 9.0
    m.free("b")  # cached again at t=9
    clock.now = 18.0
    assert m.lookup([1, 2, 3, 4, 5]) == 4
    clock.now = 1000.0
    assert m.lookup([1, 2, 3, 4, 5]) == 2  # block of [3, 4] expired, pinned [1, 2] did not
    m.unpin([1, 2])  # cached from now on
    assert m.lookup([1, 2, 0]) == 2
    clock.now = 1011.0
    assert m.lookup([1, 2, 0]) == 0
    m.check_integrity()


# ---- pinning -------------------------------------------------------------------------------------
def test_pin_keeps_blocks_from_eviction():
    m, evicted = make("lru", num_blocks=4)
    prefix = [1, 2, 3, 4]
    m.allocate("a", prefix + [5])  # 0, 1 registered; 2 partial
    m.free("a")
    assert m.pin(prefix) == 2
    assert m.eviction_order() == [] and m.num_free_blocks == 2
    s = m.stats()
    assert s.pinned_blocks == 2 and s.cached_blocks == 2 and s.used_blocks == 0
    m.allocate("x", [9, 9, 9, 9])  # 2 fresh blocks
    with pytest.raises(OutOfBlocks, match="pinned"):
        m.allocate("y", [8])
    assert evicted == [] and m.lookup(prefix + [5]) == 4
    m.free("x")
    assert m.allocate("z", prefix + [7]) == 4  # a pinned block can still be hit
    m.free("z")
    assert m.stats().pinned_blocks == 2
    assert m.unpin(prefix) == 2
    assert m.stats().pinned_blocks == 0 and m.eviction_order()[-2:] == [1, 0]
    m.allocate("w", list(range(50, 58)))  # 4 blocks: everything goes
    assert sorted(b for b, _ in evicted) == [0, 1, 2, 3]
    m.check_integrity()


def test_pins_nest_and_cover_later_registrations():
    m, evicted = make("fifo", num_blocks=3)
    p = [1, 2, 3, 4]
    assert m.pin(p) == 0  # nothing resident yet: pinned by content
    assert m.pin(p[:2]) == 0
    m.allocate("a", p + [5])
    m.free("a")
    assert m.stats().pinned_blocks == 2 and m.eviction_order() == []
    assert m.unpin(p[:2]) == 1  # block 0 still pinned once via p
    assert m.stats().pinned_blocks == 2
    assert m.unpin(p) == 2
    assert m.eviction_order() == [0, 1]
    with pytest.raises(ValueError, match="not pinned"):
        m.unpin(p)
    m.check_integrity()


def test_pin_counts_resident_blocks_in_use():
    m, _ = make("lru", num_blocks=4)
    m.allocate("a", [1, 2, 3, 4, 5])
    assert m.pin([1, 2, 3, 4, 7, 7]) == 2  # third block not resident
    m.free("a")  # released straight into the pinned set
    assert m.eviction_order() == [] and m.stats().pinned_blocks == 2
    m.unpin([1, 2, 3, 4, 7, 7])
    assert m.eviction_order() == [1, 0]
    m.check_integrity()


def test_pin_salt_namespaces():
    m, _ = make("lru", num_blocks=4)
    m.allocate("a", [1, 2, 3], salt="t")
    m.free("a")
    m.pin([1, 2])  # other namespace: protects nothing here
    assert m.eviction_order() == [0]
    m.pin([1, 2], salt="t")
    assert m.eviction_order() == []
    with pytest.raises(ValueError):
        m.unpin([1, 2], salt="u")
    m.unpin([1, 2], salt="t")
    m.unpin([1, 2])
    m.check_integrity()


# ---- reset --------------------------------------------------------------------------------------
def test_reset_prefix_cache():
    m, evicted = make("lru", num_blocks=6)
    m.allocate("a", [1, 2, 3, 4, 5])
    assert m.reset_prefix_cache() is False  # a block is in use
    assert m.lookup([1, 2, 3]) == 2
    m.pin([1, 2])
    m.free("a")
    assert m.reset_prefix_cache() is True
    s = m.stats()
    assert (s.free_blocks, s.cached_blocks, s.pinned_blocks) == (6, 0, 0)
    assert m.lookup([1, 2, 3]) == 0 and m.eviction_order() == [] and evicted == []
    m.allocate("b", list(range(12)))  # fresh again: 0..5 in order
    assert m.block_table("b") == [0, 1, 2, 3, 4, 5]
    m.free("b")
    m.allocate("c", [1, 2, 3])
    m.free("c")
    assert m.stats().pinned_blocks == 1  # pins are kept across a reset
    m.unpin([1, 2])
    m.check_integrity()


def test_on_evict_receives_block_and_hash():
    m, evicted = make("lru", num_blocks=3, block_size=2)
    m.allocate("a", [1, 2, 3, 4, 5, 6])
    hashes = m.block_hashes("a")
    m.free("a")
    m.allocate("b", [7, 7, 7, 7, 7, 7])
    assert evicted == [(2, hashes[2]), (1, hashes[1]), (0, hashes[0])]


def test_pin_does_not_revive_an_expired_block():
    clock = FakeClock()
    m, evicted = make("lru", num_blocks=4, ttl_seconds=10, clock=clock)
    m.allocate("a", [1, 2, 3])
    m.free("a")
    clock.now = 11.0
    assert m.pin([1, 2]) == 0  # expired: dropped, not pinned
    assert m.stats().pinned_blocks == 0 and m.lookup([1, 2, 3]) == 0
    m.allocate("b", [1, 2, 3])  # registered again: the content pin applies on release
    m.free("b")
    assert m.stats().pinned_blocks == 1 and evicted == []
    clock.now = 100.0
    assert m.lookup([1, 2, 3]) == 2
    m.unpin([1, 2])
    m.check_integrity()


def test_lru_batches_compact_stale_entries_and_keep_the_order():
    """Blocks hit and released again leave stale entries; they are dropped in bulk."""
    meta = BlockMeta(64)
    lru = LRUPolicy(meta)
    lru.add_many(list(range(64)))
    model = list(range(64))  # least recently released first
    rng = random.Random(0)
    compacted = 0
    for _ in range(3000):  # hit two cached blocks, release them again: 2 stale entries
        pair = rng.sample(range(64), 2)
        for b in pair:
            lru.remove(b)
            model.remove(b)
        before = lru._entries
        lru.add_many(pair)
        model += pair
        compacted += lru._entries < before
        assert lru._entries <= 2 * len(lru) + 4096 + 2  # compaction bounds the garbage
    order = lru.order()
    assert compacted >= 1 and order == model and len(lru) == 64
    assert all(meta.ref[b] < 0 for b in order)
    assert [lru.pop() for _ in range(64)] == order  # eviction follows the listed order
    assert len(lru) == 0 and lru.oldest() is None and all(r == 0 for r in meta.ref)
