"""KV events of the limits operations: evict(n), gc (TTL and the cached-block cap), a
forced reset, share_prefix and private sequences, each with its exact events."""

from __future__ import annotations

from pagedkv import BlockManager
from pagedkv.events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4
A, B, C = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]


def subscribed(m: BlockManager) -> list[list]:
    batches: list[list] = []
    m.subscribe(batches.append)
    return batches


def test_evict_n_reports_the_evicted_blocks_in_one_batch():
    m = BlockManager(8, BS)
    m.allocate("a", A + B + C + [13])
    m.free("a")
    hashes = m.hash_blocks(A + B + C)
    batches = subscribed(m)
    assert m.evict(2) == 2  # LRU: a's tail first
    assert batches == [[BlockRemoved([hashes[2], hashes[1]], "device")]]
    assert m.evict(0) == 0 and len(batches) == 1  # nothing removed: no batch


def test_gc_reports_expired_and_capped_blocks():
    now = [0.0]
    m = BlockManager(8, BS, ttl_seconds=10, clock=lambda: now[0])
    m.allocate("a", A + B + [13])
    m.free("a")
    hashes = m.hash_blocks(A + B)
    batches = subscribed(m)
    now[0] = 11.0
    assert m.gc() == 2
    assert [type(e) for e in batches[0]] == [BlockRemoved]
    assert set(batches[0][0].block_hashes) == set(hashes)

    capped = BlockManager(8, BS, max_cached_blocks=1)
    got = subscribed(capped)
    capped.allocate("a", A + B + [13])
    capped.free("a")  # the release itself trims to the cap: a's tail goes
    h = capped.hash_blocks(A + B)
    assert got[-1] == [BlockRemoved([h[1]], "device")]
    assert capped.gc() == 0 and len(got) == 2


def test_a_forced_reset_removes_the_blocks_in_use_then_clears():
    m = BlockManager(8, BS)
    m.allocate("a", A + B + [13])
    m.allocate("c", C + [14])
    m.free("c")
    batches = subscribed(m)
    assert m.reset_prefix_cache(force=True)
    (batch,) = batches
    assert batch[-1] == AllBlocksCleared("device")
    assert batch[:-1] == [BlockRemoved(m.hash_blocks(A + B), "device")]
    m.append("a", [15, 16, 17])  # a's next full block is registered (and stored) again
    assert isinstance(batches[-1][0], BlockStored)
    m.check_integrity()


def test_share_prefix_and_private_sequences_store_nothing():
    m = BlockManager(8, BS)
    m.allocate("a", A + B + [13])
    batches = subscribed(m)
    m.share_prefix("a", "b", 6)  # shares block 0, copies the partial one: nothing registered
    m.allocate("p", A + B + C, share_prefix=False)
    m.append("p", [1, 2, 3, 4])
    m.free("p")  # private blocks become free, never cached
    assert batches == []
    m.check_integrity()
