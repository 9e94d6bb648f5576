"""Bad arguments and OutOfBlocks: clear errors naming the argument, and no state change."""

from __future__ import annotations

import dataclasses

import pytest

from pagedkv import BlockManager, OutOfBlocks

PROBES = [
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], None),
    ([1, 2, 3, 4, 0], None),
    ([10, 11, 12, 13, 14], "t"),
    ([20, 21, 22, 23, 24, 25, 26, 27, 28], None),
]


def capture(m: BlockManager, probes=PROBES) -> dict:
    """Everything observable without changing anything (but ``allocation_failures``, the
    one counter a failed call bumps: callers check it themselves)."""
    return {
        "seqs": {
            sid: (
                m.block_table(sid),
                m.token_ids(sid),
                m.num_tokens(sid),
                m.block_hashes(sid),
                m.slot_mapping(sid, m.num_released(sid) * m.block_size),
            )
            for sid in m.seq_ids()
        },
        "num_free_blocks": m.num_free_blocks,
        "num_used_blocks": m.num_used_blocks,
        "stats": dataclasses.replace(m.stats(), allocation_failures=0),
        "eviction_order": m.eviction_order(),
        "lookups": [m.lookup(p, salt=s) for p, s in probes],
        "pressure": m.pressure,
        "can_allocate": [m.can_allocate(n) for n in (1, 8, 17, 40)],
        "repr": repr(m),
    }


def assert_unchanged(m: BlockManager, before: dict) -> None:
    m.check_integrity()
    assert capture(m) == before


def populated(policy: str = "lru", num_blocks: int = 10, **kw) -> BlockManager:
    """A small manager with live, shared, cached and pinned blocks (block_size 4).

    After this: 3 blocks free, 2 evictable, 1 pinned, 4 in use.
    """
    m = BlockManager(num_blocks, 4, eviction=policy, **kw)
    m.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])  # 0 1 2
    m.allocate("t", [10, 11, 12, 13, 14], salt="t")  # 3 4
    m.fork("a", "a2")
    m.allocate("old", [20, 21, 22, 23, 24, 25, 26, 27, 28])  # 5 6 7
    m.free("old")  # 5, 6 cached; 7 free
    m.free("t")  # 3 cached; 4 free
    m.pin([10, 11, 12, 13], salt="t")  # 3 pinned
    m.append("a", [1, 2])  # CoW 2 -> 4 (LIFO)
    m.take_copies()
    m.check_integrity()
    s = m.stats()
    assert (s.used_blocks, s.cached_blocks, s.pinned_blocks, s.free_blocks) == (4, 3, 1, 3)
    assert m.eviction_order() == ([5, 6] if policy == "fifo" else [6, 5])
    return m


# ---- constructor ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"num_blocks": 0}, ValueError, "num_blocks"),
        ({"num_blocks": -3}, ValueError, "num_blocks"),
        ({"num_blocks": 2.0}, TypeError, "num_blocks"),
        ({"num_blocks": "8"}, TypeError, "num_blocks"),
        ({"num_blocks": True}, TypeError, "num_blocks"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": -16}, ValueError, "block_size"),
        ({"block_size": None}, TypeError, "block_size"),
        ({"block_size": 16.0}, TypeError, "block_size"),
        ({"eviction": "mru"}, ValueError, "eviction"),
        ({"eviction": ""}, ValueError, "eviction"),
        ({"eviction": None}, TypeError, "eviction"),
        ({"eviction": 1}, TypeError, "eviction"),
        ({"hash_algo": "md5"}, ValueError, "hash_algo"),
        ({"hash_algo": ["sha256"]}, TypeError, "hash_algo"),
        ({"ttl_seconds": 0}, ValueError, "ttl_seconds"),
        ({"ttl_seconds": -1.0}, ValueError, "ttl_seconds"),
        ({"ttl_seconds": float("nan")}, ValueError, "ttl_seconds"),
        ({"ttl_seconds": "10"}, (TypeError, ValueError), "ttl_seconds"),
        ({"ttl_seconds": True}, (TypeError, ValueError), "ttl_seconds"),
        ({"watermarks": (0.9, 0.8, 0.95)}, ValueError, "watermarks"),
        ({"watermarks": (0.5, 0.6)}, ValueError, "watermarks"),
        ({"watermarks": (0.0, 0.5, 0.9)}, ValueError, "watermarks"),
        ({"watermarks": (0.5, 0.6, 1.1)}, ValueError, "watermarks"),
        ({"watermarks": (0.5, "0.6", 0.7)}, ValueError, "watermarks"),
        ({"watermarks": None}, (TypeError, ValueError), "watermarks"),
        ({"watermarks": 0.5}, (TypeError, ValueError), "watermarks"),
        ({"on_evict": 5}, TypeError, "on_evict"),
        ({"extra_keys": "model-v2"}, TypeError, "extra_keys"),
        ({"extra_keys": [1.5]}, TypeError, "extra_keys"),
        ({"extra_keys": 7}, TypeError, "extra_keys"),
        ({"clock": 3.0}, TypeError, "clock"),
    ],
)
def test_constructor_rejects(kwargs, exc, name):
    args = {"num_blocks": 8, "block_size": 4, **kwargs}
    with pytest.raises(exc, match=name):
        BlockManager(**args)


def test_constructor_accepts_edge_values():
    BlockManager(1, 1)
    BlockManager(4, 4, watermarks=(0.1, 0.2, 1.0), ttl_seconds=0.5, extra_keys=[b"k", 1, None])
    BlockManager(4, 4, hash_algo="xxh3_128", eviction="lfu", prefix_caching=False)


# ---- every public method: bad input changes nothing ----------------------------------------------
BAD_CALLS = [
    # allocate
    ("allocate live id", lambda m: m.allocate("a", [1]), ValueError, "already live"),
    ("allocate empty", lambda m: m.allocate("n", []), ValueError, "token_ids"),
    ("allocate negative", lambda m: m.allocate("n", [1, -1]), ValueError, r"token_ids\[1\]"),
    ("allocate too big", lambda m: m.allocate("n", [2**32]), ValueError, r"token_ids\[0\]"),
    ("allocate float", lambda m: m.allocate("n", [1, 2.0]), TypeError, r"token_ids\[1\]"),
    ("allocate str tok", lambda m: m.allocate("n", [1, "2"]), TypeError, r"token_ids\[1\]"),
    ("allocate None tok", lambda m: m.allocate("n", [None]), TypeError, r"token_ids\[0\]"),
    ("allocate str", lambda m: m.allocate("n", "abc"), TypeError, "token_ids"),
    ("allocate bytes", lambda m: m.allocate("n", b"abc"), TypeError, "token_ids"),
    ("allocate None", lambda m: m.allocate("n", None), TypeError, "token_ids"),
    ("allocate int", lambda m: m.allocate("n", 5), TypeError, "token_ids"),
    ("allocate gen", lambda m: m.allocate("n", (i for i in range(3))), TypeError, "token_ids"),
    ("allocate unhashable", lambda m: m.allocate(["n"], [1]), TypeError, "seq_id"),
    ("allocate salt float", lambda m: m.allocate("n", [1], salt=1.5), TypeError, "salt"),
    ("allocate salt bool", lambda m: m.allocate("n", [1], salt=True), TypeError, "salt"),
    ("allocate salt list", lambda m: m.allocate("n", [1], salt=["t"]), TypeError, "salt"),
    # append
    ("append unknown", lambda m: m.append("zz", [1]), KeyError, "zz"),
    ("append empty", lambda m: m.append("a", []), ValueError, "token_ids"),
    ("append negative", lambda m: m.append("a", [3, -5]), ValueError, r"token_ids\[1\]"),
    ("append float", lambda m: m.append("a", [0.5]), TypeError, r"token_ids\[0\]"),
    ("append None", lambda m: m.append("a", None), TypeError, "token_ids"),
    ("append str", lambda m: m.append("a", "xy"), TypeError, "token_ids"),
    # fork
    ("fork unknown", lambda m: m.fork("zz", "c"), KeyError, "zz"),
    ("fork live child", lambda m: m.fork("a", "a2"), ValueError, "a2"),
    ("fork self", lambda m: m.fork("a", "a"), ValueError, "already live"),
    ("fork unhashable", lambda m: m.fork("a", ["c"]), TypeError, "child_id"),
    # free / queries
    ("free unknown", lambda m: m.free("zz"), KeyError, "zz"),
    ("free unhashable", lambda m: m.free(["a"]), TypeError, "unhashable"),
    ("block_table unknown", lambda m: m.block_table("zz"), KeyError, "zz"),
    ("num_tokens unknown", lambda m: m.num_tokens("zz"), KeyError, "zz"),
    ("token_ids unknown", lambda m: m.token_ids("zz"), KeyError, "zz"),
    ("block_hashes unknown", lambda m: m.block_hashes("zz"), KeyError, "zz"),
    ("slot_mapping unknown", lambda m: m.slot_mapping("zz"), KeyError, "zz"),
    ("slot_mapping stop>n", lambda m: m.slot_mapping("a", 0, 12), ValueError, "stop"),
    ("slot_mapping start>n", lambda m: m.slot_mapping("a", 12), ValueError, "start"),
    ("slot_mapping start>stop", lambda m: m.slot_mapping("a", 5, 3), ValueError, "start"),
    ("slot_mapping start<0", lambda m: m.slot_mapping("a", -1), ValueError, "start"),
    ("slot_mapping stop<0", lambda m: m.slot_mapping("a", 0, -1), ValueError, "stop"),
    ("slot_mapping start float", lambda m: m.slot_mapping("a", 1.0), TypeError, "start"),
    ("slot_mapping stop str", lambda m: m.slot_mapping("a", 0, "3"), TypeError, "stop"),
    ("can_allocate negative", lambda m: m.can_allocate(-1), ValueError, "num_tokens"),
    ("can_allocate float", lambda m: m.can_allocate(1.5), TypeError, "num_tokens"),
    ("can_allocate None", lambda m: m.can_allocate(None), TypeError, "num_tokens"),
    ("lookup negative", lambda m: m.lookup([1, -2]), ValueError, r"token_ids\[1\]"),
    ("lookup str", lambda m: m.lookup("abc"), TypeError, "token_ids"),
    ("lookup salt", lambda m: m.lookup([1, 2, 3, 4, 5], salt=2.5), TypeError, "salt"),
    ("hash_blocks bad", lambda m: m.hash_blocks([1, 2, 3, 2.0]), TypeError, "token_ids"),
    # pin / unpin
    ("pin short", lambda m: m.pin([1, 2, 3]), ValueError, "token_ids"),
    ("pin empty", lambda m: m.pin([]), ValueError, "token_ids"),
    ("pin negative", lambda m: m.pin([1, 2, 3, -4]), ValueError, r"token_ids\[3\]"),
    ("pin salt", lambda m: m.pin([1, 2, 3, 4], salt=object()), TypeError, "salt"),
    ("unpin never pinned", lambda m: m.unpin([1, 2, 3, 4]), ValueError, "token_ids"),
    ("unpin other salt", lambda m: m.unpin([10, 11, 12, 13]), ValueError, "pinned"),
    ("unpin longer", lambda m: m.unpin(list(range(10, 18)), salt="t"), ValueError, "pinned"),
    ("unpin short", lambda m: m.unpin([10, 11], salt="t"), ValueError, "token_ids"),
    ("unpin bad tok", lambda m: m.unpin([10, 11, 12, None], salt="t"), TypeError, "token_ids"),
    # callbacks
    ("on_pressure", lambda m: m.on_pressure(42), TypeError, "callable"),
]


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
@pytest.mark.parametrize("what, call, exc, name", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_change_nothing(policy, what, call, exc, name):
    m = populated(policy)
    before = capture(m)
    with pytest.raises(exc, match=name):
        call(m)
    assert_unchanged(m, before)
    assert m.take_copies() == []


def test_reset_refused_while_in_use_changes_nothing():
    m = populated()
    before = capture(m)
    assert m.reset_prefix_cache() is False
    assert_unchanged(m, before)


# ---- OutOfBlocks ---------------------------------------------------------------------------------
OOB_CALLS = [
    ("allocate fresh", lambda m: m.allocate("n", list(range(100, 121)))),  # 6 > 5
    ("allocate one too many", lambda m: m.allocate("n", list(range(100, 124)) + [0])),
    # hits a's blocks 0, 1 (in use): 8 blocks, 6 new > 5
    ("allocate with hits", lambda m: m.allocate("n", [1, 2, 3, 4, 5, 6, 7, 8] + [0] * 24)),
    # hits cached blocks 5, 6: they would leave the evictable set, 3 free left for 4
    ("allocate reclaiming hits", lambda m: m.allocate("n", list(range(20, 28)) + [0] * 13)),
    ("allocate pinned hit", lambda m: m.allocate("n", [10, 11, 12, 13] + [0] * 21, salt="t")),
    ("append", lambda m: m.append("a2", [0] * 30)),
    ("append exactly one over", lambda m: m.append("a", [0] * 22)),  # 21 fit
]


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
@pytest.mark.parametrize("what, call", OOB_CALLS, ids=[c[0] for c in OOB_CALLS])
def test_out_of_blocks_changes_nothing(policy, what, call):
    evicted = []
    m = populated(policy, on_evict=lambda b, h: evicted.append(b))
    assert m.num_free_blocks == 5
    before = capture(m)
    with pytest.raises(OutOfBlocks, match="needs"):
        call(m)
    assert_unchanged(m, before)
    assert evicted == [] and m.take_copies() == []
    assert m.stats().allocation_failures == 1


def test_out_of_blocks_boundaries_are_exact():
    m = populated()
    # a has 11 tokens in 3 blocks: 9 more fit in the last + 5 blocks; 30 would not.
    m2 = populated()
    m2.append("a", [0] * 21)  # exactly 11 + 21 = 32 -> 8 blocks, 5 new
    assert m2.num_free_blocks == 0 and m2.stats().evictions == 2
    m2.check_integrity()
    # allocate with reclaimed hits: [20..27] hits 5, 6 (cached); 12 tokens more = 3 blocks
    m3 = populated()
    assert m3.allocate("n", list(range(20, 28)) + [0] * 12) == 8
    assert m3.block_table("n")[:2] == [5, 6] and m3.num_free_blocks == 0
    m3.check_integrity()
    # the pinned block can be hit: 1 hit + 5 new blocks
    m4 = populated()
    assert m4.allocate("n", [10, 11, 12, 13] + [0] * 20, salt="t") == 4
    assert m4.block_table("n")[0] == 3
    m4.check_integrity()
    assert m.num_free_blocks == 5


def test_out_of_blocks_on_cow():
    m = BlockManager(2, 4)
    m.allocate("p", [1, 2])  # 0
    m.fork("p", "c")
    m.allocate("x", [3])  # 1: the pool is full
    before = capture(m)
    with pytest.raises(OutOfBlocks, match="1 new block"):
        m.append("c", [5])  # a partial shared block needs a copy
    assert_unchanged(m, before)
    assert m.take_copies() == []
    m.free("x")
    m.append("c", [5])
    assert m.take_copies() == [(0, 1)]
    m.check_integrity()


def test_out_of_blocks_with_only_pinned_cached_blocks():
    m = BlockManager(3, 2)
    m.allocate("a", [1, 2, 3, 4, 5, 6])
    m.pin([1, 2, 3, 4, 5, 6])
    m.free("a")
    before = capture(m)
    with pytest.raises(OutOfBlocks, match="3 pinned"):
        m.allocate("b", [9])
    assert_unchanged(m, before)
    m.unpin([1, 2, 3, 4, 5, 6])
    m.allocate("b", [9])
    m.check_integrity()


def test_failed_calls_do_not_fire_pressure_callbacks():
    m = populated()
    seen = []
    m.on_pressure(seen.append)
    for _, call in OOB_CALLS:
        with pytest.raises(OutOfBlocks):
            call(m)
    for _, call, exc, _ in BAD_CALLS:
        if call is BAD_CALLS[-1][1]:
            continue
        with pytest.raises(exc):
            call(m)
    assert seen == []
