"""Prefix limits of the block manager, with exact numbers: min_prefix_tokens,
max_cached_blocks, share_prefix=False, evict(n), gc(), reset_prefix_cache(force=True).

Block size 4 throughout; ``P`` is a 3-block prompt. Free blocks are handed out lowest
id first from a fresh pool (the free stack pops 0, 1, 2, ...), so block ids are exact.
"""

from __future__ import annotations

import pytest

from pagedkv import BlockManager
from pagedkv.manager import ManagerConfig
from test_manager_errors import assert_unchanged, capture, populated

BS = 4
P = list(range(1, 13))  # blocks 0, 1, 2 when allocated first


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def manager(num_blocks: int = 16, **kw) -> tuple[BlockManager, list[int]]:
    evicted: list[int] = []
    m = BlockManager(num_blocks, BS, on_evict=lambda b, h: evicted.append(b), **kw)
    return m, evicted


# ---- min_prefix_tokens -----------------------------------------------------------------------


def test_prompts_below_min_prefix_tokens_neither_hit_nor_register():
    m, _ = manager(min_prefix_tokens=8)
    assert m.allocate("a", P) == 0
    m.free("a")  # 3 cached blocks
    assert m.stats().cached_blocks == 3
    short = P[:7]  # its first block is cached, but 7 < 8 tokens
    assert m.lookup(short) == 0
    assert m.allocate("short", short) == 0
    assert m.block_table("short") == [3, 4] and not m.shares_prefix("short")
    assert m.block_hashes("short") == []
    m.append("short", [8, 9])  # now 9 tokens, 2 full blocks: still private, nothing registered
    assert m.block_hashes("short") == [] and m.stats().cached_blocks == 3
    m.free("short")
    s = m.stats()
    assert (s.cached_blocks, s.free_blocks, s.hit_tokens, s.evictions) == (3, 13, 0, 0)
    # exactly min_prefix_tokens tokens is enough: it hits (leaving one token) and registers
    assert m.lookup(P[:8]) == 4
    assert m.allocate("eight", P[:8]) == 4 and m.shares_prefix("eight")
    assert m.stats().requests_with_hit == 1 and m.stats().requests_without_hit == 2
    m.check_integrity()


def test_min_prefix_tokens_zero_is_the_default_and_shares_every_prompt():
    m, _ = manager()
    assert m.min_prefix_tokens == 0 and m.config.min_prefix_tokens == 0
    m.allocate("a", [1])
    assert m.shares_prefix("a")


# ---- max_cached_blocks ------------------------------------------------------------------------


def test_release_beyond_max_cached_blocks_evicts_the_excess_by_the_policy():
    m, evicted = manager(max_cached_blocks=2)
    m.allocate("a", P)  # blocks 0, 1, 2
    m.free("a")  # LRU lists the tail first: 2, 1, 0 -> 2 (the unique tail) goes
    assert evicted == [2] and m.eviction_order() == [1, 0]
    s = m.stats()
    assert (s.cached_blocks, s.free_blocks, s.evictions) == (2, 14, 1)
    m.allocate("b", list(range(50, 58)))  # the evicted block 2 is handed out again first
    assert m.block_table("b") == [2, 3]
    m.free("b")  # 1, 0, 3, 2 listed: the two oldest (a's prefix) are evicted
    assert evicted == [2, 1, 0] and m.eviction_order() == [3, 2]
    s = m.stats()
    assert (s.cached_blocks, s.free_blocks, s.evictions) == (2, 14, 3)
    assert m.lookup(P) == 0 and m.lookup(list(range(50, 58)) + [0]) == 8
    m.check_integrity()


def test_pinned_blocks_do_not_count_against_the_cap_and_unpin_trims():
    m, evicted = manager(max_cached_blocks=1)
    m.pin(P)
    m.allocate("a", P + [0])  # blocks 0-2 registered (pinned content), 3 partial
    m.allocate("b", [40, 41, 42, 43, 44])  # blocks 4, 5
    m.free("a")  # 0-2 held pinned, 3 free (partial)
    m.free("b")  # 4 cached (5 partial, free)
    s = m.stats()
    assert (s.pinned_blocks, s.cached_blocks, evicted) == (3, 4, [])
    assert m.unpin(P) == 3  # 2, 1, 0 join 4: four evictable > 1, the oldest three go
    assert evicted == [4, 2, 1] and m.eviction_order() == [0]
    m.check_integrity()


def test_max_cached_blocks_zero_caches_nothing_and_evicts_every_release():
    m, evicted = manager(max_cached_blocks=0)
    m.allocate("a", P + [0])
    m.free("a")
    assert evicted == [2, 1, 0] and m.stats().cached_blocks == 0
    assert m.stats().free_blocks == 16 and m.stats().evictions == 3
    m.check_integrity()


def test_a_prefix_hit_takes_blocks_out_of_the_capped_set():
    m, evicted = manager(max_cached_blocks=3)
    m.allocate("a", P + [0])
    m.free("a")
    assert m.allocate("b", P + [7]) == 12 and m.stats().cached_blocks == 0
    m.free("b")
    assert evicted == [] and m.stats().cached_blocks == 3
    m.check_integrity()


@pytest.mark.parametrize(
    "kw, exc",
    [
        ({"min_prefix_tokens": -1}, ValueError),
        ({"min_prefix_tokens": 2.0}, TypeError),
        ({"min_prefix_tokens": True}, TypeError),
        ({"min_prefix_tokens": None}, TypeError),
        ({"max_cached_blocks": -1}, ValueError),
        ({"max_cached_blocks": "8"}, TypeError),
        ({"max_cached_blocks": False}, TypeError),
    ],
)
def test_limit_options_are_validated_naming_the_field(kw, exc):
    (field,) = kw
    with pytest.raises(exc, match=field):
        ManagerConfig(**kw)
    with pytest.raises(exc, match=field):
        BlockManager(8, 4, **kw)


def test_limit_options_round_trip_through_the_config():
    cfg = ManagerConfig(min_prefix_tokens=8, max_cached_blocks=100)
    m = BlockManager.from_config(16, 4, cfg)
    assert (m.min_prefix_tokens, m.max_cached_blocks) == (8, 100) and m.config == cfg
    assert cfg.override(max_cached_blocks=5).max_cached_blocks == 5
    assert cfg.override().max_cached_blocks == 100  # None keeps what the config has


# ---- share_prefix=False ------------------------------------------------------------------------


def test_a_private_request_neither_matches_nor_registers():
    m, evicted = manager()
    m.allocate("pub", P)
    m.free("pub")  # 0-2 cached
    assert m.allocate("priv", P + [1], share_prefix=False) == 0  # the cached copy is not used
    assert m.block_table("priv") == [3, 4, 5, 6] and not m.shares_prefix("priv")
    assert m.stats().cached_blocks == 3 and m.lookup(P + [1]) == 12  # public copy intact
    m.fork("priv", "priv2")  # a private parent has a private child
    assert not m.shares_prefix("priv2") and m.block_hashes("priv2") == []
    assert m.allocate("priv3", P + [1], share_prefix=False) == 0  # private twins share nothing
    assert m.block_table("priv3") == [7, 8, 9, 10]
    for sid in ("priv", "priv2", "priv3"):
        m.free(sid)
    s = m.stats()
    assert (s.cached_blocks, s.free_blocks, s.evictions, evicted) == (3, 13, 0, [])
    assert s.requests_without_hit == 3 and s.hit_tokens == 0
    m.check_integrity()


def test_private_blocks_never_reach_the_eviction_policy():
    m, evicted = manager(num_blocks=4)
    m.allocate("priv", P + [0], share_prefix=False)
    m.free("priv")
    assert m.eviction_order() == [] and m.num_free_blocks == 4
    m.allocate("x", list(range(60, 76)))  # takes all 4 blocks: nothing to evict, no on_evict
    assert evicted == []


def test_share_prefix_must_be_a_bool_and_nothing_changes():
    m = populated()
    before = capture(m)
    with pytest.raises(TypeError, match="share_prefix"):
        m.allocate("n", [1, 2, 3], share_prefix=0)  # type: ignore[arg-type]
    assert_unchanged(m, before)


# ---- evict(n), gc() ---------------------------------------------------------------------------


def test_evict_takes_up_to_n_in_policy_order_and_never_a_pinned_block():
    m, evicted = manager()
    m.pin([90, 91, 92, 93])
    for sid, start in (("a", 100), ("b", 200)):
        m.allocate(sid, list(range(start, start + 8)))
    m.allocate("p", [90, 91, 92, 93, 0])
    for sid in ("a", "b", "p"):
        m.free(sid)  # evictable: 1, 0, 3, 2; pinned: 4
    assert m.eviction_order() == [1, 0, 3, 2]
    assert m.evict(0) == 0 and evicted == []
    assert m.evict(3) == 3 and evicted == [1, 0, 3]
    assert m.evict(10) == 1 and evicted == [1, 0, 3, 2]
    s = m.stats()
    assert (s.cached_blocks, s.pinned_blocks, s.free_blocks, s.evictions) == (1, 1, 15, 4)
    assert m.evict(5) == 0  # only the pinned block is left
    m.check_integrity()


def test_evict_drops_expired_blocks_first_without_counting_them():
    clock = FakeClock()
    m, evicted = manager(ttl_seconds=10, clock=clock)
    m.allocate("old", list(range(100, 109)))  # blocks 0, 1 registered, 2 partial
    m.allocate("new", list(range(200, 209)))  # blocks 3, 4 registered, 5 partial
    m.free("old")
    clock.now = 15.0  # old's blocks idle 15 s > 10 (no block handed out since: not dropped yet)
    m.free("new")
    assert m.evict(1) == 1
    assert evicted == [4]  # the expired 1, 0 were dropped (no on_evict), then 4 evicted
    s = m.stats()
    assert (s.cached_blocks, s.evictions) == (1, 3)
    m.check_integrity()


@pytest.mark.parametrize("n, exc", [(-1, ValueError), (1.0, TypeError), (None, TypeError)])
def test_evict_refuses_bad_counts_and_changes_nothing(n, exc):
    m = populated()
    before = capture(m)
    with pytest.raises(exc, match="n must"):
        m.evict(n)
    assert_unchanged(m, before)


def test_gc_drops_exactly_the_expired_blocks():
    clock = FakeClock()
    m, evicted = manager(ttl_seconds=10, clock=clock, max_cached_blocks=5)
    m.allocate("a", list(range(100, 113)))  # 0, 1, 2 registered, 3 partial
    m.free("a")
    clock.now = 5.0
    m.allocate("b", list(range(200, 205)))  # 3 registered (4 partial)
    m.free("b")
    assert m.gc() == 0  # nothing expired, nothing over the cap
    clock.now = 12.0  # a's three blocks are idle 12 s > 10, b's 7 s
    assert m.gc() == 3 and evicted == []  # expiry is not an eviction: no on_evict
    s = m.stats()
    assert (s.cached_blocks, s.free_blocks, s.evictions) == (1, 15, 3)
    m.check_integrity()


# ---- reset_prefix_cache(force=True) ------------------------------------------------------------


def test_forced_reset_keeps_blocks_in_use_but_unregisters_them():
    m, evicted = manager()
    m.allocate("a", P + [1])  # 0-3
    m.allocate("b", P + [2])  # hits 0-2 (a chain), own 4
    m.allocate("c", list(range(50, 59)))  # 5, 6 registered, 7 partial
    m.free("c")
    m.pin(list(range(50, 54)))  # 5 held pinned
    m.fork("b", "b2")
    assert m.reset_prefix_cache() is False  # refused while in use
    tables = {sid: m.block_table(sid) for sid in m.seq_ids()}
    assert m.reset_prefix_cache(force=True) is True
    assert {sid: m.block_table(sid) for sid in m.seq_ids()} == tables  # KV stays put
    s = m.stats()
    assert (s.used_blocks, s.cached_blocks, s.pinned_blocks, s.free_blocks) == (5, 0, 0, 11)
    assert evicted == [] and m.lookup(P + [9]) == 0 and m.lookup(list(range(50, 59))) == 0
    m.check_integrity()
    m.append("a", [3, 4, 5])  # a's block 3 fills: registered, but its parents are not
    assert m.lookup(P + [1, 3, 4, 5, 0]) == 0
    for sid in ("a", "b", "b2"):
        m.free(sid)
    s = m.stats()
    assert (s.cached_blocks, s.free_blocks) == (1, 15)  # only block 3, filled after reset
    m.check_integrity()
    assert m.reset_prefix_cache() is True and m.stats().free_blocks == 16


def test_reset_force_must_be_a_bool():
    m = populated()
    before = capture(m)
    with pytest.raises(TypeError, match="force"):
        m.reset_prefix_cache(force=1)  # type: ignore[arg-type]
    assert_unchanged(m, before)


def test_the_manager_demo_shows_pins_limits_and_evict(capsys):
    from pagedkv.manager import demo

    r = demo.run(num_requests=60, max_live=8, decode_tokens=16, max_cached_blocks=40)
    assert "evict(n) at the end" in capsys.readouterr().out
    assert r["pinned_blocks"] > 0 and 0 < r["peak_cached"] <= 40
    # ids 9, 19, ..., 59 private; 24 and 49 short (49 is both)
    assert r["private_requests"] == 7
    assert 0 < r["evicted_on_demand"] <= 40
