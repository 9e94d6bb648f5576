"""Every check_integrity() can fail: plant each kind of damage it guards against.

For each invariant a checker enforces, a live object in a rich state (shared
chains, forks, copy-on-write, cached, pinned, anonymous and free blocks, swapped
sequences, tiers holding blocks) is corrupted in the smallest way that violates it,
and the checker must raise :class:`CacheIntegrityError` naming it. The untouched
object passes first, so every failure is the planted one.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv import BlockManager, CacheIntegrityError, KVCache, KVLayout
from pagedkv.manager.prefix_index import UNREGISTERED
from pagedkv.storage import KVPool
from pagedkv.testing import SyntheticPager
from pagedkv.tiers import CPUTier, DiskTier, TieredStore

BS = 4
P = list(range(1, 13))  # 3 full blocks: the shared prompt


def rich_manager(eviction: str = "lru", prefix_caching: bool = True) -> BlockManager:
    """A manager in every state at once; the named sequences are used below.

    a: P + 1 token (3 registered blocks + a partial one), shared by its fork c;
    b, b2: hit P's chain (two holders of one chain) + a partial block each;
    h: 12 tokens in 3 full blocks; f: one anonymous block (g holds that content);
    p: private (share_prefix=False), 6 tokens; s: share_prefix of h's first 6 tokens;
    two released sequences leave 4 evictable blocks in two LRU batches;
    one pinned prefix block; the rest free.
    """
    m = BlockManager(32, BS, eviction=eviction, prefix_caching=prefix_caching)
    m.allocate("a", P + [100])
    m.allocate("b", P + [200, 201])
    m.allocate("b2", P + [300])
    m.fork("a", "c")
    for sid, start in (("d", 500), ("i", 600)):
        m.allocate(sid, list(range(start, start + 8)))
        m.free(sid)
    q = [60, 61, 62, 63]
    m.allocate("e", q + [64])
    if prefix_caching:
        m.pin(q)
    m.free("e")
    m.allocate("f", [70, 71, 72])
    m.allocate("g", [70, 71, 72, 73, 74])
    m.append("f", [73])  # f's block fills with content g registered first: anonymous
    m.allocate("h", list(range(80, 92)))
    if prefix_caching:
        m.allocate("p", [1, 2, 3, 4, 5, 6], share_prefix=False)
    m.share_prefix("h", "s", 6)
    m.take_copies()
    m.check_integrity()
    return m


def seq(m: BlockManager, sid: str):
    return m._seqs[sid]


# The manager's tables (the mutations below plant damage in them).
def free_stack(m: BlockManager) -> list[int]:
    return m._alloc.free


def pinned_set(m: BlockManager) -> set[int]:
    return m._alloc.pins.blocks


def pin_counts(m: BlockManager) -> dict[bytes, int]:
    return m._alloc.pins.counts


def hashes(m: BlockManager) -> list[bytes]:
    return m._prefix.hashes


def evictable(m: BlockManager) -> int:
    return m.eviction_order()[0]


def pinned(m: BlockManager) -> int:
    return next(iter(pinned_set(m)))


def in_use(m: BlockManager) -> int:
    return seq(m, "h").blocks[2]  # h alone holds it (s shares h's block 0)


def _dup_in_lru_batch(m):
    _, blocks = m._alloc.policy._batches[-1]
    blocks.append(blocks[0])
    m._alloc.policy._entries += 1


def _swap_index_keys(m):
    (k1, b1), (k2, b2) = list(m._prefix.by_key.items())[:2]
    m._prefix.by_key[k1], m._prefix.by_key[k2] = b2, b1


def _chain_of_other_blocks(m):
    s = seq(m, "b2")  # same tail as b's chain, another block in front
    s.blocks[0] = seq(m, "h").blocks[0]


def _register_partial(m):
    last = seq(m, "b").blocks[-1]
    hashes(m)[last] = b"\x07" * 32


def _unregister(m, block):
    hashes(m)[block] = UNREGISTERED


MANAGER_MUTATIONS = [
    pytest.param(lambda m: free_stack(m).append(free_stack(m)[0]), "free stack holds duplicates",
                 id="free-stack-duplicate"),
    pytest.param(lambda m: free_stack(m).append(m.num_blocks), "free stack holds block ids outside",
                 id="free-stack-id-out-of-range"),
    pytest.param(_dup_in_lru_batch, "eviction policy lists a block twice",
                 id="lru-lists-block-twice"),
    pytest.param(lambda m: setattr(m._alloc.policy, "_len", m._alloc.policy._len + 1),
                 "policy lists 4 blocks but counts 5", id="policy-count-off-by-one"),
    pytest.param(lambda m: setattr(m._alloc.policy, "_entries", m._alloc.policy._entries + 1),
                 "LRU holds 4 batch entries but counts 5", id="lru-entry-count"),
    pytest.param(lambda m: m._alloc.policy._batches.reverse(), "LRU batch stamps",
                 id="lru-batches-out-of-order"),
    pytest.param(lambda m: setattr(m._alloc.policy, "_stamp", m._alloc.policy._stamp - 1),
                 "LRU batch stamps", id="lru-stamp-beyond-counter"),
    pytest.param(lambda m: seq(m, "h").tokens.extend([1, 2, 3, 4, 5]),
                 "seq 'h': 3 blocks for 17 tokens (want 5)", id="17-tokens-in-3-blocks-of-4"),
    pytest.param(lambda m: seq(m, "h").blocks.__setitem__(1, seq(m, "h").blocks[0]),
                 "seq 'h' lists a block twice", id="block-twice-in-one-table"),
    pytest.param(lambda m: setattr(seq(m, "h"), "last_hash", b"\x01" * 32),
                 "seq 'h': its last block hash is not its tokens' hash", id="wrong-last-hash"),
    pytest.param(lambda m: setattr(seq(m, "h"), "chain", 3), "seq 'h': a hit chain of 3 blocks",
                 id="hit-chain-covers-every-token"),
    pytest.param(lambda m: seq(m, "h").blocks.__setitem__(0, m.num_blocks),
                 "seq 'h' lists block ids outside", id="table-id-out-of-range"),
    pytest.param(lambda m: _unregister(m, seq(m, "h").blocks[1]),
                 "seq 'h': full block 1", id="full-block-unregistered"),
    pytest.param(lambda m: hashes(m).__setitem__(seq(m, "h").blocks[2], b"\x02" * 32),
                 "full block 2", id="full-block-under-another-hash"),
    pytest.param(lambda m: seq(m, "h").anonymous.append(seq(m, "h").blocks[0]),
                 "but listed anonymous", id="registered-block-listed-anonymous"),
    pytest.param(lambda m: seq(m, "f").anonymous.append(free_stack(m)[0]),
                 "seq 'f': anonymous blocks", id="anonymous-block-not-in-table"),
    pytest.param(lambda m: seq(m, "f").anonymous.clear(), "seq 'f': full block 0",
                 id="anonymous-block-forgotten"),
    pytest.param(_register_partial, "partial last block", id="partial-block-registered"),
    pytest.param(_chain_of_other_blocks, "hit chain differs", id="chains-differ-same-tail"),
    pytest.param(lambda m: m._alloc.chains.__setitem__(seq(m, "a").blocks[2], 3),
                 "chain holders", id="chain-holders-off-by-one"),
    pytest.param(lambda m: m._ref.__setitem__(in_use(m), 2), "ref counts disagree",
                 id="ref-count-one-too-high"),
    pytest.param(lambda m: m._ref.__setitem__(seq(m, "a").blocks[3], 1), "ref counts disagree",
                 id="ref-count-one-too-low"),
    pytest.param(lambda m: free_stack(m).pop(), "!= num_blocks(32)",
                 id="free-used-cached-not-total"),
    pytest.param(lambda m: free_stack(m).append(in_use(m)), "free blocks [",
                 id="free-block-in-use"),
    pytest.param(lambda m: pinned_set(m).add(in_use(m)), "pinned blocks [",
                 id="pinned-block-in-use"),
    pytest.param(lambda m: m._ref.__setitem__(free_stack(m)[0], -1), "hold an LRU stamp",
                 id="free-block-holds-lru-stamp"),
    pytest.param(lambda m: free_stack(m).append(evictable(m)),
                 "in two of free / evictable / pinned", id="block-free-and-cached"),
    pytest.param(lambda m: pinned_set(m).add(evictable(m)), "in two of free / evictable / pinned",
                 id="block-evictable-and-pinned"),
    pytest.param(lambda m: hashes(m).__setitem__(free_stack(m)[0], b"\x03" * 32),
                 "a free block still has a registered hash", id="free-block-registered"),
    pytest.param(lambda m: _unregister(m, evictable(m)), "a cached block has no registered hash",
                 id="cached-block-unregistered"),
    pytest.param(lambda m: pin_counts(m).pop(hashes(m)[pinned(m)]), "its hash is not pinned",
                 id="pinned-set-without-pin"),
    pytest.param(lambda m: pin_counts(m).__setitem__(hashes(m)[evictable(m)], 1),
                 "a pinned prefix block is evictable", id="pin-without-pinned-set"),
    pytest.param(lambda m: pin_counts(m).__setitem__(hashes(m)[pinned(m)], 0),
                 "pin counts must be >= 1", id="pin-count-zero"),
    pytest.param(lambda m: m._prefix.by_key.__setitem__(b"stray", in_use(m)),
                 "index has 13 entries but 12 blocks", id="index-entry-without-registration"),
    pytest.param(_swap_index_keys, "does not match the block's key", id="index-vs-block-key"),
    pytest.param(lambda m: hashes(m).__setitem__(evictable(m), b"\x04" * 32),
                 "registered hash is not the digest of its index key",
                 id="index-vs-registered-hash"),
    pytest.param(lambda m: setattr(seq(m, "h"), "last_access", 1e18),
                 "seq 'h': last_access 1e+18 is not a clock time <= now", id="access-in-future"),
    pytest.param(lambda m: setattr(seq(m, "s"), "last_access", float("nan")),
                 "seq 's': last_access nan", id="access-nan"),
    pytest.param(lambda m: setattr(seq(m, "p"), "last_access", None),
                 "seq 'p': last_access None", id="access-missing"),
    pytest.param(lambda m: setattr(seq(m, "p"), "last_hash", b"\x06" * 32),
                 "seq 'p' is private but", id="private-with-hash-chain"),
    pytest.param(lambda m: seq(m, "p").anonymous.append(seq(m, "p").blocks[0]),
                 "seq 'p' is private but", id="private-with-anonymous"),
    pytest.param(lambda m: setattr(seq(m, "h"), "private", True),
                 "seq 'h' is private but has a hit chain of 0, registered blocks",
                 id="registered-sequence-marked-private"),
    pytest.param(lambda m: setattr(m._counters, "deallocations", m._counters.deallocations + 1),
                 "(2 + 8 allocated + 2 forked) - deallocations (4) != live sequences (9)",
                 id="deallocations-off-by-one"),
    pytest.param(lambda m: setattr(m._counters, "forks", 0),
                 "+ 0 forked) - deallocations", id="forks-forgotten"),
    pytest.param(lambda m: setattr(m._counters, "hit_tokens", 10**6), "hit_tokens (1000000) >",
                 id="more-hits-than-queries"),
    pytest.param(lambda m: setattr(m._counters, "requests_with_hit", 0),
                 "disagree with requests_with_hit (0", id="hits-without-hit-requests"),
    pytest.param(lambda m: setattr(m._counters, "requests_with_hit", 50),
                 "disagree with requests_with_hit (50", id="hit-requests-without-hits"),
    pytest.param(lambda m: setattr(m._counters, "allocation_failures", -1),
                 "counters ['allocation_failures'] are negative", id="negative-counter"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), MANAGER_MUTATIONS)
def test_block_manager_check_fires(mutate, message):
    m = rich_manager()
    mutate(m)
    with pytest.raises(CacheIntegrityError, match=_literal(message)):
        m.check_integrity()


def _heap_dup(m):
    m._alloc.policy._heap.append(m._alloc.policy._heap[0])


HEAP_MUTATIONS = [
    pytest.param(lambda m: m._alloc.policy.add(in_use(m)), "evictable blocks [",
                 id="evictable-block-in-use"),
    pytest.param(lambda m: m._ref.__setitem__(free_stack(m)[0], -1), "hold an LRU stamp",
                 id="lru-stamp-under-heap-policy"),
    pytest.param(_heap_dup, "eviction policy lists a block twice", id="heap-lists-block-twice"),
    pytest.param(lambda m: m._alloc.policy._blocks.__setitem__(free_stack(m)[0], 10**6),
                 "policy lists 4 blocks but counts 5", id="heap-member-without-entry"),
]  # fmt: skip


@pytest.mark.parametrize("eviction", ["fifo", "lfu"])
@pytest.mark.parametrize(("mutate", "message"), HEAP_MUTATIONS)
def test_heap_policy_checks_fire(eviction, mutate, message):
    m = rich_manager(eviction)
    mutate(m)
    with pytest.raises(CacheIntegrityError, match=_literal(message)):
        m.check_integrity()


def test_cap_on_cached_blocks_fires():
    m = rich_manager()
    m._alloc.capped, m._alloc.max_cached = True, 3  # 4 evictable blocks exceed it
    with pytest.raises(CacheIntegrityError, match=_literal("4 evictable cached blocks exceed")):
        m.check_integrity()


def test_registration_without_prefix_caching_fires():
    m = rich_manager(prefix_caching=False)
    hashes(m)[in_use(m)] = b"\x05" * 32
    with pytest.raises(CacheIntegrityError, match="prefix caching is off but 1 blocks"):
        m.check_integrity()


def test_every_problem_is_reported_at_once():
    m = rich_manager()
    seq(m, "h").last_hash = b"\x01" * 32
    m._ref[seq(m, "a").blocks[3]] = 1
    with pytest.raises(CacheIntegrityError) as info:
        m.check_integrity()
    assert "last block hash" in str(info.value) and "ref counts disagree" in str(info.value)


# -- KVCache ------------------------------------------------------------------------------

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=BS, dtype=torch.float32)


def rich_cache(tmp_path, tiers: bool = True) -> KVCache:
    """Live, forked and swapped-out sequences over a CPU tier spilling to disk."""
    tier_list = [CPUTier(8 * LAYOUT.bytes_per_block), DiskTier(tmp_path / "disk", 1 << 20)]
    cache = KVCache(LAYOUT, 12, tiers=tier_list if tiers else None)
    cache.allocate("x", P + [1])
    cache.fork("x", "y")
    cache.allocate("z", list(range(40, 46)), salt="tenant")
    if tiers:
        cache.allocate("s", list(range(50, 55)))
        cache.swap_out("s")
        for i in range(8):  # evictions: blocks demoted to the CPU tier and spilled to disk
            cache.allocate(f"t{i}", list(range(100 + 20 * i, 112 + 20 * i)))
            cache.free(f"t{i}")
        cache.flush()
        stats = cache.tier_stats()["tiers"]
        assert stats["cpu"]["entries"] == 8 and stats["disk"]["entries"] > 0
    cache.check_integrity()
    return cache


def _resident_and_swapped(cache):
    cache._swapped["x"] = cache._swapped.pop("s")


CACHE_MUTATIONS = [
    pytest.param(_resident_and_swapped, "are both resident and swapped out",
                 id="resident-and-swapped"),
    pytest.param(lambda c: c._swapped.pop("s"), "the tiers hold 1 swapped-out sequences",
                 id="swap-area-vs-swapped-list"),
    pytest.param(lambda c: c._salts.__setitem__("ghost", None), "salts recorded for dead",
                 id="salt-of-dead-sequence"),
    pytest.param(lambda c: c._salts.pop("z"), "missing for ['z']", id="salt-missing"),
    pytest.param(lambda c: setattr(c.pool, "num_blocks", 13), "pool has 13 blocks, manager 12",
                 id="pool-vs-manager-size"),
    pytest.param(lambda c: c._evicted.append((0, b"\x00" * 32)), "never demoted",
                 id="eviction-not-demoted"),
    pytest.param(lambda c: c.manager._alloc.chains.__setitem__(c.manager._seqs["x"].blocks[0], 1),
                 "chain holders", id="manager-problem-surfaces"),
    pytest.param(lambda c: setattr(c.tiers._swap, "used_bytes", 0), "SwapArea",
                 id="tier-problem-surfaces"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), CACHE_MUTATIONS)
def test_kvcache_check_fires(tmp_path, mutate, message):
    cache = rich_cache(tmp_path)
    try:
        mutate(cache)
        with pytest.raises(CacheIntegrityError, match=_literal(message)):
            cache.check_integrity()
    finally:
        cache.close()


def test_kvcache_swapped_without_tiers_fires(tmp_path):
    cache = rich_cache(tmp_path, tiers=False)
    cache._swapped["s"] = ([1, 2], None, "swap-key")
    with pytest.raises(CacheIntegrityError, match="swapped out but there are no tiers"):
        cache.check_integrity()


# -- tiers and stores ---------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path):
    """A CPU tier (4 blocks) spilling to a disk tier, holding blocks, with a swap."""
    pool = KVPool(LAYOUT, 16)
    pool.kv.copy_(torch.randn(pool.kv.shape))
    ts = TieredStore(
        [CPUTier(4 * LAYOUT.bytes_per_block), DiskTier(tmp_path / "d", 1 << 20)], LAYOUT, "fp"
    )
    ts.attach(pool)
    ts.demote([(b, bytes([b]) * 32) for b in range(8)])  # 4 stay in CPU, 4 spill to disk
    ts.flush()
    ts.swap_out("swap-1", [8, 9])
    ts.check_integrity()
    yield ts
    ts.close()


def _memory(ts):
    return ts.levels[0].store


def _disk(ts):
    return ts.levels[1].store.inner  # the DiskStore under the disk tier's framing


def _index_two_keys_one_slot(ts):
    store = _memory(ts)
    k1, k2 = list(store._slot_of)[:2]
    store._slot_of[k2] = store._slot_of[k1]


def _free_slot_twice(ts):
    store = _memory(ts)
    store.delete_many([next(iter(store._slot_of))])  # a legitimately free slot...
    store._free.append(store._free[-1])  # ...on the free stack twice


def _free_a_used_slot(ts):
    store = _memory(ts)
    store._free.append(next(iter(store._slot_of.values())))


def _lose_slot(ts):
    store = _memory(ts)
    store._slot_of.pop(next(iter(store._slot_of)))  # the slot is neither used nor free now


def _slot_out_of_range(ts):
    store = _memory(ts)
    key = next(iter(store._slot_of))
    store._slot_of[key] = store.num_slots + 5


def _add_lru_bytes(store, n):
    store._lru.bytes_used += n  # the store's one LRU counts its bytes


def _lru_key_without_slot(ts):
    # the tier's recency index is its store's LRU (a level keeps none of its own)
    _memory(ts)._lru.add("kv-extra", 0)


TIER_MUTATIONS = [
    pytest.param(lambda ts: setattr(ts._swap, "used_bytes", ts._swap.used_bytes + 1),
                 "SwapArea: rows hold", id="swap-bytes-vs-rows"),
    pytest.param(lambda ts: setattr(ts._swap, "capacity_bytes", 1), "capacity_bytes(1)",
                 id="swap-rows-over-capacity"),
    pytest.param(_lru_key_without_slot, "MemoryStore: LRU index (5 keys) and slot map (4 keys)",
                 id="tier-index-over-capacity"),
    pytest.param(_index_two_keys_one_slot, "MemoryStore: duplicate slots",
                 id="memory-two-keys-one-slot"),
    pytest.param(_free_slot_twice, "MemoryStore: duplicate slots",
                 id="memory-free-stack-duplicate"),
    pytest.param(_free_a_used_slot, "both used and free", id="memory-slot-used-and-free"),
    pytest.param(_lose_slot, "!= num_slots(4)", id="memory-slot-lost"),
    pytest.param(_slot_out_of_range, "!= num_slots(4)", id="memory-slot-out-of-range"),
    pytest.param(lambda ts: _add_lru_bytes(_memory(ts), 1),
                 "MemoryStore: bytes_used", id="memory-bytes-used"),
    pytest.param(lambda ts: _add_lru_bytes(_disk(ts), 1),
                 "DiskStore: bytes_used", id="disk-bytes-used"),
    pytest.param(lambda ts: setattr(_disk(ts)._lru, "capacity_bytes", 1),
                 "DiskStore: bytes_used", id="disk-over-capacity"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), TIER_MUTATIONS)
def test_tier_and_store_checks_fire(chain, mutate, message):
    mutate(chain)
    with pytest.raises(CacheIntegrityError, match=_literal(message)):
        chain.check_integrity()


# -- the snapshot layer's synthetic pager -------------------------------------------------


def rich_pager() -> SyntheticPager:
    pager = SyntheticPager(LAYOUT, 16)
    pager.allocate("a", P + [1])
    pager.allocate("b", P + [2])  # shares P's blocks
    pager.allocate("c", list(range(40, 48)))
    pager.free("c")  # cached blocks
    pager.check_integrity()
    return pager


PAGER_MUTATIONS = [
    pytest.param(lambda p: p._free.pop(), "!= num_blocks(16)", id="pager-block-lost"),
    pytest.param(lambda p: p._ref.__setitem__(p._seqs["a"][1][0], 1),
                 "ref counts disagree", id="pager-ref-off-by-one"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), PAGER_MUTATIONS)
def test_synthetic_pager_check_fires(mutate, message):
    pager = rich_pager()
    mutate(pager)
    with pytest.raises(CacheIntegrityError, match=_literal(message)):
        pager.check_integrity()


def _literal(message: str) -> str:
    import re

    return re.escape(message)


def changed_manager() -> BlockManager:
    """A manager after a model change (issue 19): v1 blocks cached and in use by a live
    sequence of the old generation (which filled a block since), a pinned v1 prefix, v2
    blocks, and a ghost list holding one evicted v1 block."""
    m = BlockManager(12, BS, extra_keys=("v1",))
    m.allocate("old", P + [100])  # 3 registered v1 blocks + a partial one
    m.allocate("gone", list(range(500, 508)))
    m.free("gone")  # 2 cached v1 blocks
    m.pin(P)
    m.set_extra_keys(("v2",))
    m.append("old", [101, 102, 103])  # fills a block: mixed KV, never registered
    m.allocate("new", list(range(600, 609)))  # v2: 2 registered blocks + a partial one
    m.allocate("evictor", list(range(700, 716)))  # 3 free blocks + 1 evicted v1 block
    m.check_integrity()
    assert m.stats().invalidated_blocks == 4 and len(m._alloc.ghosts) == 1
    return m


def _ghost_reason(m, reason):
    chunks = m._alloc.ghosts._chunks
    chunks[0] = (reason, chunks[0][1])


def _reorder_pin_sources(m):
    pins = m._alloc.pins
    pins.sources = dict(reversed(list(pins.sources.items())))


GENERATION_MUTATIONS = [
    pytest.param(lambda m: setattr(m._alloc.ghosts, "_sealed", 2),
                 "ghost list holds 0 hashes in sealed chunks but counts 2", id="ghost-count"),
    pytest.param(lambda m: setattr(m._alloc.ghosts, "_open", []),
                 "ghost list holds 0 hashes in sealed chunks but counts 0", id="ghost-open-chunk"),
    pytest.param(lambda m: setattr(m._alloc.ghosts, "max_entries", 0),
                 "over its cap of 0", id="ghosts-over-cap"),
    pytest.param(lambda m: _ghost_reason(m, "stolen"), "neither evicted nor expired",
                 id="ghost-reason"),
    pytest.param(lambda m: m._gens._live.__setitem__(0, 5),
                 "earlier generations count [5] registered blocks, their stamps say [4]",
                 id="generation-count"),
    pytest.param(lambda m: m._gens._bounds.append(0), "generation bounds",
                 id="generation-bounds-order"),
    pytest.param(lambda m: setattr(m._gens, "active", False), "generations active=False",
                 id="generation-active-flag"),
    pytest.param(lambda m: setattr(seq(m, "new"), "gen", 5), "generation 5 outside [-1, 1]",
                 id="seq-generation-out-of-range"),
    pytest.param(lambda m: setattr(seq(m, "new"), "gen", 0), "registered in a later one",
                 id="seq-holds-later-generation-block"),
    pytest.param(lambda m: m._alloc.pins.sources.popitem(), "pin sources for",
                 id="pin-source-missing"),
    pytest.param(_reorder_pin_sources, "neither the root nor pinned before it",
                 id="pin-sources-child-first"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), GENERATION_MUTATIONS)
def test_generation_ghost_and_pin_checks_fire(mutate, message):
    m = changed_manager()
    mutate(m)
    with pytest.raises(CacheIntegrityError, match=_literal(message)):
        m.check_integrity()
