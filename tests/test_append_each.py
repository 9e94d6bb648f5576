"""append_each (BlockManager and KVCache): the same state as append() one pair at a time,
its fast path and every fallback, and bad input changing nothing."""

from __future__ import annotations

import random

import pytest
import torch

from pagedkv import BlockManager, KVCache, KVLayout, OutOfBlocks
from pagedkv.errors import CachePausedError


def state(m: BlockManager, ids) -> tuple:
    """What append can change: tables, tokens, cached hashes, free blocks, counters."""
    return (
        [m.block_table(s) for s in ids], [m.token_ids(s) for s in ids],
        [m.block_hashes(s) for s in ids], m.num_free_blocks, sorted(m.cached_blocks()),
        m.stats(),
    )  # fmt: skip


def twins(bs: int = 4, n: int = 64, **kw) -> tuple[BlockManager, BlockManager, list[str]]:
    """Two managers with the same sequences: "a"/"b" share a 6-token prefix (a shared,
    partly filled block: copy-on-write), "c" is one block from full, "d" has an empty
    reserved tail slot, "e" is aligned (its next token takes a new block)."""
    ms = []
    for _ in range(2):
        m = BlockManager(n, bs, **kw)
        m.allocate("a", list(range(6)))
        m.fork("a", "b")
        m.allocate("c", list(range(20, 20 + 2 * bs - 1)))
        m.allocate("d", list(range(40, 45)))
        m.allocate("e", list(range(60, 60 + 2 * bs)))
        ms.append(m)
    return ms[0], ms[1], ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_matches_append_one_at_a_time_over_many_steps(bs):
    kw = dict(bs=bs, n=256)
    m1, m2, ids = twins(**kw)
    rng = random.Random(bs)
    for _ in range(3 * bs + 5):
        step = [s for s in ids if rng.random() < 0.8]
        toks = [rng.randrange(1000) for _ in step]
        for s, t in zip(step, toks):
            m1.append(s, [t])
        m2.append_each(step, toks)
        assert state(m1, ids) == state(m2, ids)
        assert m1.take_copies() == m2.take_copies()  # the copy-on-write of "a"/"b"
    m2.check_integrity()
    assert m2.lookup(m2.token_ids("c")) == m1.lookup(m1.token_ids("c")) > 0  # registered


def test_matches_append_with_a_subscriber():
    m1, m2, ids = twins()
    seen1, seen2 = [], []
    m1.subscribe(seen1.extend)
    m2.subscribe(seen2.extend)
    for k in range(9):
        toks = [100 + k + i for i in range(len(ids))]
        for s, t in zip(ids, toks):
            m1.append(s, [t])
        m2.append_each(ids, toks)
    assert state(m1, ids) == state(m2, ids)
    assert [type(e).__name__ for e in seen1] == [type(e).__name__ for e in seen2]
    assert seen2  # blocks filled and were stored


def test_bad_input_changes_nothing():
    _, m, ids = twins()
    before = state(m, ids)
    with pytest.raises(ValueError, match="one token per sequence"):
        m.append_each(ids, [1, 2])
    with pytest.raises(ValueError):
        m.append_each(["a", "b"], [1, -5])
    with pytest.raises(TypeError):
        m.append_each(["a", "b"], [1, "x"])
    with pytest.raises(KeyError, match="unknown sequence 'zz'"):
        m.append_each(["a", "zz"], [1, 2])
    assert state(m, ids) == before
    m.append_each([], [])  # nothing to do
    assert state(m, ids) == before


def test_out_of_blocks_part_way_keeps_the_appends_before():
    m = BlockManager(3, 4)
    m.allocate("x", [1, 2, 3])
    m.allocate("y", [5, 6, 7, 8, 9, 10, 11, 12])  # aligned: its next token needs a block
    with pytest.raises(OutOfBlocks):
        m.append_each(["x", "y"], [4, 13])
    assert m.token_ids("x") == [1, 2, 3, 4] and m.num_tokens("y") == 8
    m.check_integrity()


def test_kvcache_append_each_runs_the_copies_and_names_the_missing_id():
    cache = KVCache(KVLayout(1, 2, 8, 4, torch.float32), 16)
    cache.allocate("p", list(range(6)))
    slots = torch.tensor(cache.slot_mapping("p"))
    cache.write(0, slots, torch.randn(6, 2, 8), torch.randn(6, 2, 8))
    cache.fork("p", "c")
    before = cache.pool.gather(0, cache.block_table("p"), 6)
    cache.append_each(["c", "p"], [99, 98])  # "c" copies the shared partial block on write
    assert cache.block_table("c")[1] != cache.block_table("p")[1]
    for sid in ("c", "p"):
        got = cache.pool.gather(0, cache.block_table(sid), 6)
        assert all(torch.equal(g, b) for g, b in zip(got, before))
    assert cache.manager.token_ids("c")[-1] == 99 and cache.manager.token_ids("p")[-1] == 98
    with pytest.raises(KeyError, match="'nope'"):
        cache.append_each(["c", "nope"], [1, 2])
    assert cache.manager.num_tokens("c") == 7  # nothing appended
    cache.check_integrity()


def test_kvcache_append_each_refused_while_paused():
    cache = KVCache(KVLayout(1, 2, 8, 4, torch.float32), 16)
    cache.allocate("p", [1, 2])
    with cache.paused(), pytest.raises(CachePausedError, match="append_each"):
        cache.append_each(["p"], [3])
    assert cache.manager.num_tokens("p") == 2
