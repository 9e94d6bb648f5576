"""BlockManager.discard / KVCache.discard: undo an allocation whose KV never arrived."""

from __future__ import annotations

import pytest

from pagedkv import BlockManager

BS = 4


@pytest.mark.parametrize("eviction", ["lru", "fifo", "lfu"])
def test_discard_forgets_the_new_blocks_and_keeps_the_hits(eviction):
    m = BlockManager(16, BS, eviction=eviction)
    system = list(range(8))
    m.allocate("x", system + [99])
    m.free("x")  # blocks 0, 1 cached; 2 free
    cached_before = sorted(m.eviction_order())
    free_before = m.num_free_blocks
    assert m.allocate("a", system + list(range(50, 62))) == 8  # 5 blocks: 2 hits + 3 new
    new = m.block_table("a")[2:]
    m.discard("a")
    assert "a" not in m and m.num_free_blocks == free_before
    assert sorted(m.eviction_order()) == cached_before  # the hits stay cached
    assert not any(m._prefix.hashes[b] for b in new)  # the new blocks are not findable
    assert m.lookup(system + list(range(50, 62))) == 8
    m.check_integrity()


def test_discard_keeps_blocks_another_sequence_holds():
    m = BlockManager(16, BS)
    m.allocate("a", list(range(10)))
    m.fork("a", "b")
    m.discard("a")
    assert m.block_table("b") and m.lookup(list(range(10))) == 8
    m.check_integrity()
    m.discard("b")  # the last holder: now nothing of it stays
    assert m.lookup(list(range(10))) == 0 and m.num_free_blocks == 16
    m.check_integrity()


def test_discard_unpins_forgotten_blocks_and_pins_stay_by_content():
    m = BlockManager(16, BS)
    prompt = list(range(9))
    m.pin(prompt)
    m.allocate("a", prompt)
    m.discard("a")
    assert m.stats().pinned_blocks == 0 and m.num_free_blocks == 16
    m.check_integrity()
    m.allocate("b", prompt)
    m.free("b")
    assert m.stats().pinned_blocks == 2  # the pin still covers the content
    m.check_integrity()


def test_discard_of_an_unknown_id_changes_nothing():
    m = BlockManager(8, BS)
    m.allocate("a", [1, 2, 3])
    with pytest.raises(KeyError, match="unknown sequence 'zz'"):
        m.discard("zz")
    assert m.seq_ids() == ["a"]
    m.check_integrity()


def test_kvcache_discard_drops_the_salt_and_respects_pause():
    torch = pytest.importorskip("torch")
    from pagedkv import KVCache, KVLayout, PagedKVError

    cache = KVCache(KVLayout(1, 1, 4, BS, torch.float32), 8)
    cache.allocate("a", list(range(9)), salt="s")
    with cache.paused(), pytest.raises(PagedKVError, match="paused"):
        cache.discard("a")
    cache.discard("a")
    assert "a" not in cache and cache.manager.lookup(list(range(9)), "s") == 0
    cache.check_integrity()
