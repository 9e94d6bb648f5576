"""KVCacheGroup on CPU: members as "devices" with distinct pools; placement, moves,
rebalance, atomicity and the group's integrity check."""

from __future__ import annotations

import pytest
import torch

from _groupcases import assert_kv, assert_same_state, group_state, write_kv
from pagedkv import CacheIntegrityError, KVCache, KVCacheGroup, KVLayout, OutOfBlocks, PagedKVError
from pagedkv.group import MoveResult
from pagedkv.group.rebalance import next_move
from pagedkv.storage import pool_copy

BS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=BS, dtype=torch.float32)


def group_of(*num_blocks: int, **options) -> KVCacheGroup:
    return KVCacheGroup.create(LAYOUT, list(num_blocks), ["cpu"] * len(num_blocks), **options)


def put(group: KVCacheGroup, seq_id, tokens, salt=None, device=None) -> int:
    """Allocate and write the sequence's KV (from the tokens not cached) like an engine."""
    cached = group.allocate(seq_id, tokens, salt, device=device)
    write_kv(group.cache_of(seq_id), seq_id, cached)
    return cached


# -- construction and validation ---------------------------------------------------------


def test_members_are_named_after_devices_or_given_names():
    g = group_of(8, 8, 4)
    assert g.supported_devices() == ["cpu#0", "cpu#1", "cpu#2"]
    assert [c.num_blocks for c in g.members().values()] == [8, 8, 4]
    one = KVCacheGroup([KVCache(LAYOUT, 4)])
    assert one.supported_devices() == ["cpu"]
    named = KVCacheGroup({"a": KVCache(LAYOUT, 4), "b": KVCache(LAYOUT, 4)})
    assert named.supported_devices() == ["a", "b"] and named.member("b") is named.members()["b"]
    assert group_of(4, 4, names=None).member("cpu#1").num_blocks == 4
    g2 = KVCacheGroup.create(LAYOUT, 4, ["cpu", "cpu"], names=["x", "y"])
    assert g2.supported_devices() == ["x", "y"]


def test_bad_members_are_refused():
    a = KVCache(LAYOUT, 4)
    with pytest.raises(ValueError, match="at least one member"):
        KVCacheGroup([])
    with pytest.raises(TypeError, match="must be a KVCache"):
        KVCacheGroup([a, "cpu"])
    with pytest.raises(TypeError, match="mapping name -> KVCache or a list"):
        KVCacheGroup(a)
    with pytest.raises(ValueError, match="same cache"):
        KVCacheGroup([a, a])
    with pytest.raises(ValueError, match="same cache"):
        KVCacheGroup({"x": a, "y": a})
    with pytest.raises(TypeError, match="non-empty strings"):
        KVCacheGroup({1: a})
    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="layout"):
        KVCacheGroup([a, KVCache(other, 4)])
    with pytest.raises(ValueError, match="model 'm2'"):
        KVCacheGroup([a, KVCache(LAYOUT, 4, model_fingerprint="m2")])
    b = KVCache(LAYOUT, 4)
    a.allocate("s", [1, 2, 3])
    b.allocate("s", [1, 2])
    with pytest.raises(ValueError, match="sequence 's' is in members"):
        KVCacheGroup([a, b])
    with pytest.raises(ValueError, match="chunk_bytes"):
        KVCacheGroup([a], chunk_bytes=0)
    with pytest.raises(ValueError, match="2 num_blocks for 3 devices"):
        KVCacheGroup.create(LAYOUT, [4, 4], ["cpu"] * 3)
    with pytest.raises(TypeError, match="devices must be a sequence"):
        KVCacheGroup.create(LAYOUT, 4, "cpu")


def test_existing_sequences_join_the_group():
    a, b = KVCache(LAYOUT, 8), KVCache(LAYOUT, 8)
    a.allocate("x", [1, 2, 3, 4, 5])
    g = KVCacheGroup({"a": a, "b": b})
    assert g.seq_ids() == ["x"] and g.device_of("x") == "a"
    g.check_integrity()


def test_device_names_resolve_or_fail_clearly():
    g = KVCacheGroup({"only": KVCache(LAYOUT, 4)})
    assert g.member("cpu") is g.member("only") is g.member(torch.device("cpu"))
    two = group_of(4, 4)
    with pytest.raises(ValueError, match="ambiguous"):
        two.member("cpu")
    with pytest.raises(ValueError, match=r"unknown device 'cuda:3'.*cpu#0"):
        two.member("cuda:3")
    with pytest.raises(ValueError, match="unknown device 'nonsense'"):
        two.member("nonsense")
    with pytest.raises(TypeError, match="member name or a torch.device"):
        two.member(0)


def test_bad_calls_change_nothing():
    g = group_of(8, 8)
    put(g, "a", list(range(9)))
    before = group_state(g)
    bad = [
        (ValueError, lambda: g.allocate("a", [1, 2])),  # live id
        (TypeError, lambda: g.allocate(["unhashable"], [1, 2])),
        (ValueError, lambda: g.allocate("b", [])),
        (TypeError, lambda: g.allocate("b", "abc")),
        (ValueError, lambda: g.allocate("b", [1], device="cuda:7")),
        (KeyError, lambda: g.append("nope", [1])),
        (KeyError, lambda: g.free("nope")),
        (KeyError, lambda: g.move("nope", "cpu#1")),
        (ValueError, lambda: g.move("a", "cpu#0")),  # already there
        (ValueError, lambda: g.move("a", "elsewhere")),
        (ValueError, lambda: g.fork("a", "a")),
        (KeyError, lambda: g.fork("nope", "c")),
        (ValueError, lambda: g.set_device_preference(["cpu#1", "cpu#1"])),
        (ValueError, lambda: g.set_device_preference(["gpu"])),
        (TypeError, lambda: g.set_device_preference("cpu#1")),
        (ValueError, lambda: g.rebalance(1.5)),
        (TypeError, lambda: g.rebalance("0.1")),
        (ValueError, lambda: g.rebalance(0.1, max_moves=-1)),
        (KeyError, lambda: g.unpin("a")),
        (KeyError, lambda: g.pin("nope")),
    ]
    for exc, call in bad:
        with pytest.raises(exc):
            call()
        assert_same_state(before, group_state(g))
    assert g.device_preference() == []
    g.check_integrity()


def test_an_id_held_by_a_member_directly_is_refused():
    g = group_of(8, 8)
    g.member("cpu#1").allocate("direct", [1, 2, 3])
    with pytest.raises(ValueError, match="outside the group"):
        g.allocate("direct", [4, 5])
    put(g, "p", [1, 2, 3])
    with pytest.raises(ValueError, match="outside the group"):
        g.fork("p", "direct")


# -- placement ---------------------------------------------------------------------------


def test_placement_most_free_then_preference_then_affinity():
    g = group_of(8, 12, 10)
    assert put(g, "a", [1, 2, 3]) == 0 and g.device_of("a") == "cpu#1"  # most free blocks
    g.set_device_preference(["cpu#2", "cpu#0"])
    put(g, "b", [4, 5, 6])
    assert g.device_of("b") == "cpu#2"
    assert g.device_preference() == ["cpu#2", "cpu#0"]
    # a member without room is skipped: cpu#2 has 9 free blocks, 10 are needed
    put(g, "c", list(range(100, 140)))
    assert g.device_of("c") == "cpu#1"
    # prefix affinity beats the preference list: "a"'s prefix is cached on cpu#1
    prompt = [7] * 9
    put(g, "d", prompt, device="cpu#0")
    g.free("d")
    assert put(g, "e", prompt + [8]) == 8 and g.device_of("e") == "cpu#0"
    stats = g.device_stats()
    assert (stats["cpu#0"].prefix_hits, stats["cpu#0"].prefix_hit_tokens) == (1, 8)
    assert stats["cpu#0"].placements == 2 and stats["cpu#1"].prefix_hits == 0
    assert [stats[n].placements for n in ("cpu#1", "cpu#2")] == [2, 1]
    # the longest cached prefix wins, whatever the preference
    put(g, "f", prompt[:4] + [1] * 8, device="cpu#2")
    assert put(g, "h", prompt + [9, 9, 9]) == 8 and g.device_of("h") == "cpu#0"
    g.set_device_preference([])
    assert g.device_preference() == []
    g.check_integrity()
    for s in g.seq_ids():
        assert_kv(g, s)


def test_salt_separates_affinity():
    g = group_of(8, 8)
    prompt = list(range(9))
    put(g, "t1", prompt, salt="tenant-1", device="cpu#1")
    assert put(g, "t2", prompt, salt="tenant-2") == 0 and g.device_of("t2") == "cpu#0"
    assert put(g, "t1b", prompt, salt="tenant-1") == 8 and g.device_of("t1b") == "cpu#1"


def test_out_of_blocks_everywhere_changes_nothing():
    g = group_of(3, 2)
    put(g, "a", [1] * 5)
    before = group_state(g)
    with pytest.raises(OutOfBlocks, match=r"needs up to 5 blocks.*cpu#1 has 2, cpu#0 has 1 free"):
        g.allocate("big", list(range(20)))
    with pytest.raises(OutOfBlocks):
        g.allocate("big", list(range(10)), device="cpu#1")
    assert_same_state(before, group_state(g))


# -- sequences ---------------------------------------------------------------------------


def test_sequence_calls_go_to_the_member():
    g = group_of(8, 8)
    put(g, "a", [1, 2, 3], device="cpu#1")
    g.append("a", [4, 5])
    write_kv(g.cache_of("a"), "a", 3)
    assert g.token_ids("a") == [1, 2, 3, 4, 5] and g.num_tokens("a") == 5
    assert g.block_table("a") == g.member("cpu#1").block_table("a")
    g.fork("a", "b")
    assert g.device_of("b") == "cpu#1" and g.salt("b") is None
    assert "a" in g and "zz" not in g and [] not in g and len(g) == 2
    g.free("a")
    assert g.seq_ids() == ["b"] and "a" not in g.member("cpu#1")
    assert_kv(g, "b")
    g.check_integrity()


# -- moves -------------------------------------------------------------------------------


def test_move_is_bit_exact_and_registers_the_prefix_on_the_target():
    g = group_of(16, 16)
    tokens = list(range(1, 15))  # 3 full blocks + 2 tokens
    put(g, "a", tokens, salt="s", device="cpu#0")
    src = g.member("cpu#0")
    before = src.read_blocks(src.block_table("a")).clone()
    r = g.move("a", "cpu#1")
    assert isinstance(r, MoveResult)
    assert (r.source, r.target, r.blocks_copied, r.blocks_reused) == ("cpu#0", "cpu#1", 4, 0)
    assert r.bytes_copied == 4 * LAYOUT.bytes_per_block and r.route == "host" and r.peer is None
    assert r.seconds > 0
    dst = g.member("cpu#1")
    assert torch.equal(dst.read_blocks(dst.block_table("a")), before)
    assert g.device_of("a") == "cpu#1" and "a" not in src
    assert g.token_ids("a") == tokens and g.salt("a") == "s"
    # full blocks are findable on the target; the source keeps them cached (freed)
    assert dst.manager.lookup(tokens + [0], "s") == 12
    assert src.manager.lookup(tokens + [0], "s") == 12 and src.manager.num_used_blocks == 0
    assert_kv(g, "a")
    # and back: the source's cached blocks are reused, only the partial block is copied
    back = g.move("a", "cpu#0")
    assert (back.blocks_copied, back.blocks_reused) == (1, 3)
    assert torch.equal(src.read_blocks(src.block_table("a")), before)
    g.check_integrity()


def test_prefix_blocks_cached_on_the_target_are_reused_not_copied():
    g = group_of(32, 32)
    system = list(range(100, 116))  # 4 full blocks
    put(g, "x", system + [1, 2, 3], device="cpu#1")
    put(g, "a", system + list(range(200, 210)), device="cpu#0")
    before = g.member("cpu#0").read_blocks(g.block_table("a")).clone()
    r = g.move("a", "cpu#1")
    assert (r.blocks_reused, r.blocks_copied) == (4, 3)  # 26 tokens = 7 blocks
    assert r.bytes_copied == 3 * LAYOUT.bytes_per_block
    assert g.block_table("a")[:4] == g.block_table("x")[:4]  # shared on the target
    dst = g.member("cpu#1")
    assert torch.equal(dst.read_blocks(g.block_table("a")), before)
    s = g.device_stats()["cpu#1"]
    assert (s.moves_in, s.blocks_copied_in, s.blocks_reused_in) == (1, 3, 4)
    assert g.device_stats()["cpu#0"].moves_out == 1
    for sid in ("a", "x"):
        assert_kv(g, sid)
    g.check_integrity()


def test_moving_one_fork_leaves_the_other_intact():
    g = group_of(16, 16)
    put(g, "p", list(range(10)), device="cpu#0")
    g.fork("p", "c")
    g.append("c", [42])
    write_kv(g.cache_of("c"), "c", 10)
    r = g.move("c", "cpu#1")
    assert r.blocks_copied == 3
    assert g.device_of("p") == "cpu#0" and g.device_of("c") == "cpu#1"
    for sid in ("p", "c"):
        assert_kv(g, sid)
    g.check_integrity()


def test_move_keeps_the_order_of_seq_ids():
    g = group_of(16, 16)
    for sid in "abc":
        put(g, sid, [ord(sid)] * 3, device="cpu#0")
    g.move("b", "cpu#1")
    assert g.seq_ids() == ["a", "b", "c"]


def test_move_out_of_blocks_changes_nothing():
    g = group_of(16, 3)
    put(g, "small", [9] * 5, device="cpu#1")
    put(g, "a", list(range(13)), device="cpu#0")  # 4 blocks; the target has 1 free
    before = group_state(g)
    with pytest.raises(OutOfBlocks):
        g.move("a", "cpu#1")
    assert_same_state(before, group_state(g))
    g.check_integrity()


def _failing_host_copy(after: int, calls: list):
    """A host route that copies ``after`` blocks, then fails like a broken transfer."""
    real = pool_copy._ROUTES["host"]

    def copy(src, s, dst, d, plan):
        calls.append(len(s))
        real(src, s[:after], dst, d[:after], plan)
        raise RuntimeError("injected copy failure")

    return copy


@pytest.mark.parametrize("cached_on_target", [False, True])
def test_failed_copy_changes_nothing_on_either_side(monkeypatch, cached_on_target):
    g = group_of(16, 16)
    system = list(range(100, 108))
    if cached_on_target:  # a prefix hit on the target must stay cached, with its bytes
        put(g, "x", system + [1], device="cpu#1")
        g.free("x")
    put(g, "other", [5] * 6, device="cpu#1")
    put(g, "a", system + list(range(20, 30)), device="cpu#0")
    before = group_state(g)
    lookup = g.member("cpu#1").manager.lookup(g.token_ids("a") + [0])
    calls: list = []
    monkeypatch.setitem(pool_copy._ROUTES, "host", _failing_host_copy(2, calls))
    with pytest.raises(RuntimeError, match="injected"):
        g.move("a", "cpu#1")
    assert calls == [3 if cached_on_target else 5]
    assert_same_state(before, group_state(g))
    # the half-written blocks are not findable on the target
    assert g.member("cpu#1").manager.lookup(g.token_ids("a") + [0]) == lookup
    g.check_integrity()
    monkeypatch.undo()
    g.move("a", "cpu#1")  # and the move succeeds once the copy works
    assert_kv(g, "a")
    g.check_integrity()


def test_failed_copy_onto_a_full_target_only_loses_evicted_cached_blocks(monkeypatch):
    g = group_of(16, 6)
    for i in range(3):  # the target's 6 blocks: 1 in use, 3 cached, 2 never used
        put(g, f"c{i}", [10 + i] * 4 + [0], device="cpu#1")
        g.free(f"c{i}")
    put(g, "live", [7] * 3, device="cpu#1")
    put(g, "a", list(range(20, 36)), device="cpu#0")  # 4 blocks: 2 free + 2 evicted
    before = group_state(g)
    monkeypatch.setitem(pool_copy._ROUTES, "host", _failing_host_copy(1, []))
    with pytest.raises(RuntimeError, match="injected"):
        g.move("a", "cpu#1")
    after = group_state(g)
    assert_same_state(before, after, evictions=True)
    lost = set(before["members"]["cpu#1"]["registered"]) - set(
        after["members"]["cpu#1"]["registered"]
    )
    assert len(lost) == 2 and g.member("cpu#1").stats().evictions == 2
    g.check_integrity()


def test_paused_members_refuse_a_move_and_nothing_changes():
    g = group_of(16, 16)
    put(g, "a", list(range(9)), device="cpu#0")
    before = group_state(g)
    for name in ("cpu#0", "cpu#1"):  # source paused: its free() refuses after the copy
        with g.member(name).paused(), pytest.raises(PagedKVError, match="paused"):
            g.move("a", "cpu#1")
        assert_same_state(before, group_state(g))
    g.check_integrity()


def test_pinned_sequences_do_not_move():
    g = group_of(16, 16)
    put(g, "a", [1] * 5, device="cpu#0")
    g.pin("a")
    assert g.pinned() == ["a"]
    with pytest.raises(ValueError, match="pinned"):
        g.move("a", "cpu#1")
    g.unpin("a")
    g.move("a", "cpu#1")
    g.pin("a")
    g.free("a")  # drops the pin
    assert g.pinned() == []
    g.check_integrity()


# -- rebalance ---------------------------------------------------------------------------


def test_rebalance_picks_the_sequence_that_best_evens_the_pair():
    g = group_of(16, 16)
    for sid, blocks in (("two", 2), ("four", 4), ("six", 6)):
        put(g, sid, [ord(sid[0])] * (blocks * BS), device="cpu#0")
    moves = g.rebalance(0.1)
    # 12 of 16 used vs 0: moving six blocks gives 6 / 6
    assert [(m.seq_id, m.source, m.target) for m in moves] == [("six", "cpu#0", "cpu#1")]
    assert g.rebalance(0.1) == []  # already within the spread
    assert_kv(g, "six")
    g.check_integrity()


def _loaded_group() -> KVCacheGroup:
    g = group_of(24, 24, 16)
    for i in range(8):
        put(g, f"s{i}", [i + 1] * (3 + 5 * i % 11), device="cpu#0")
    put(g, "t", [50] * 9, device="cpu#2")
    return g


def test_rebalance_reaches_the_spread_and_is_deterministic():
    g, h = _loaded_group(), _loaded_group()
    g.pin("s7")
    h.pin("s7")
    moves = g.rebalance(0.15)
    assert moves and [(m.seq_id, m.target) for m in moves] == [
        (m.seq_id, m.target) for m in h.rebalance(0.15)
    ]
    fracs = [s.used_fraction for s in g.device_stats().values()]
    assert max(fracs) - min(fracs) <= 0.15
    assert g.device_of("s7") == "cpu#0"
    assert len({m.seq_id for m in moves}) == len(moves)  # nobody moves twice in one call
    for sid in g.seq_ids():
        assert_kv(g, sid)
    g.check_integrity()


def test_rebalance_stops_when_no_move_narrows_the_gap_and_honours_max_moves():
    g = group_of(8, 8)
    put(g, "huge", [3] * 28, device="cpu#0")  # 7 of 8 blocks: moving it only flips the gap
    assert g.rebalance(0.1) == []
    h = _loaded_group()
    assert len(h.rebalance(0.0, max_moves=1)) == 1
    assert h.rebalance(0.0, max_moves=0) == []


def test_device_stats_report_bytes():
    g = group_of(8, 4)
    put(g, "a", [1] * 6, device="cpu#1")
    s = g.device_stats()
    bpb = LAYOUT.bytes_per_block
    assert (s["cpu#1"].bytes_used, s["cpu#1"].bytes_total) == (2 * bpb, 4 * bpb)
    assert s["cpu#1"].used_fraction == 0.5 and s["cpu#1"].sequences == 1
    assert s["cpu#0"].cache.used_blocks == 0 and s["cpu#0"].device == "cpu"
    assert "cpu#1: 2/4" in repr(g)


# -- integrity ---------------------------------------------------------------------------


def test_check_integrity_fires_on_every_kind_of_damage():
    def fresh() -> KVCacheGroup:
        g = group_of(8, 8)
        put(g, "a", [1] * 5, device="cpu#0")
        put(g, "b", [2] * 5, device="cpu#1")
        g.check_integrity()
        return g

    g = fresh()
    g.member("cpu#1").allocate("sneaky", [3, 3])
    with pytest.raises(CacheIntegrityError, match="'sneaky' is live in \\['cpu#1'\\] but not"):
        g.check_integrity()
    g = fresh()
    g.member("cpu#1").allocate("a", [3, 3])
    with pytest.raises(CacheIntegrityError, match="'a' is live in members"):
        g.check_integrity()
    g = fresh()
    g._where["a"] = "cpu#1"
    with pytest.raises(CacheIntegrityError, match="map puts 'a' on 'cpu#1'"):
        g.check_integrity()
    g = fresh()
    g.member("cpu#0").free("a")
    with pytest.raises(
        CacheIntegrityError, match=r"map puts 'a' on 'cpu#0'; members holding it: \[\]"
    ):
        g.check_integrity()
    g = fresh()
    g._pinned.add("ghost")
    with pytest.raises(CacheIntegrityError, match="pinned ids \\['ghost'\\]"):
        g.check_integrity()
    g = fresh()
    g.member("cpu#1").manager._ref[g.block_table("b")[0]] += 1
    with pytest.raises(CacheIntegrityError, match="member 'cpu#1'.*ref counts"):
        g.check_integrity()
    g = fresh()
    g.fingerprint = "other"
    with pytest.raises(CacheIntegrityError, match="layout or fingerprint differs"):
        g.check_integrity()


# -- the copy between pools --------------------------------------------------------------


def test_copy_blocks_between_validates_before_copying():
    a, b = KVCache(LAYOUT, 8).pool, KVCache(LAYOUT, 8).pool
    a.kv.normal_()
    other = KVCache(KVLayout(2, 2, 8, 8, torch.float32), 8).pool
    bad = [
        (ValueError, "same pool", lambda: pool_copy.copy_blocks_between(a, [0], a, [1])),
        (ValueError, "layouts differ", lambda: pool_copy.copy_blocks_between(a, [0], other, [1])),
        (
            ValueError,
            "2 source blocks but 1",
            lambda: pool_copy.copy_blocks_between(a, [0, 1], b, [1]),
        ),
        (ValueError, "out of range", lambda: pool_copy.copy_blocks_between(a, [8], b, [1])),
        (ValueError, "out of range", lambda: pool_copy.copy_blocks_between(a, [0], b, [-1])),
        (ValueError, "distinct", lambda: pool_copy.copy_blocks_between(a, [0, 1], b, [2, 2])),
        (TypeError, "ints", lambda: pool_copy.copy_blocks_between(a, [True], b, [2])),
        (TypeError, "two KVPools", lambda: pool_copy.copy_blocks_between(a, [0], b.kv, [2])),
        (
            ValueError,
            "chunk_bytes",
            lambda: pool_copy.copy_blocks_between(a, [0], b, [2], chunk_bytes=0),
        ),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
        assert not b.kv.any()
    done = pool_copy.copy_blocks_between(a, [3, 0, 5], b, [1, 7, 2])
    assert (done.route, done.blocks, done.bytes) == ("host", 3, 3 * LAYOUT.bytes_per_block)
    assert torch.equal(b.read_blocks([1, 7, 2]), a.read_blocks([3, 0, 5]))
    assert pool_copy.copy_blocks_between(a, [], b, []).blocks == 0


def test_staged_route_is_bit_exact_in_chunks():
    a, b = KVCache(LAYOUT, 8).pool, KVCache(LAYOUT, 8).pool
    a.kv.normal_()
    pool_copy._copy_staged(a, [6, 1, 4, 3, 0], b, [0, 2, 5, 6, 7], pool_copy.Plan(2))
    assert torch.equal(b.read_blocks([0, 2, 5, 6, 7]), a.read_blocks([6, 1, 4, 3, 0]))


def test_routes_between_device_kinds():
    assert pool_copy.route("cpu", "cpu") == "host"
    assert pool_copy.route("cuda:0", "cuda:0") == "device"
    assert pool_copy.route("cuda:0", "cuda:1") == "peer"
    assert pool_copy.route("cpu", "cuda:1") == "h2d"
    assert pool_copy.route(torch.device("cuda", 0), "cpu") == "d2h"
    assert pool_copy.route("cpu", "meta") == "staged"
    assert pool_copy.peer_access(torch.device("cpu"), torch.device("cpu")) is None


def test_next_move_ties_go_to_member_order_and_the_oldest():
    used, size = {"a": 8, "b": 8, "c": 0}, {"a": 16, "b": 16, "c": 16}
    candidates = [("x", "b", 4), ("y", "a", 4), ("z", "a", 4)]
    assert next_move(used, size, candidates, 0.1) == ("y", "a", "c")
    assert next_move(used, size, [("w", "a", 16)], 0.1) is None  # it would only widen the gap
    assert next_move({"a": 2, "b": 0}, {"a": 16, "b": 16}, candidates, 0.2) is None
