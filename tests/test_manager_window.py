"""Blocks released outside a sliding window: the manager, KVCache, swap, moves, snapshots.

``release_before(seq, n)`` drops the sequence's whole blocks before token ``n``: a
registered one becomes cached (evictable, findable), an unregistered one free; its table
entry holds NULL_BLOCK. Every other operation must stay correct around the placeholders,
and check_integrity() must catch damage to them.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv import CacheIntegrityError, KVCache, KVCacheGroup, KVLayout
from pagedkv.errors import SnapshotError
from pagedkv.manager import BlockManager
from pagedkv.manager.sequence import NULL_BLOCK
from pagedkv.snapshot import SnapshotStore
from pagedkv.tiers import CPUTier

BS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=BS, dtype=torch.float32)


def counts(m: BlockManager) -> tuple[int, int, int]:
    s = m.stats()
    return s.used_blocks, s.cached_blocks, s.free_blocks


def state(m: BlockManager) -> tuple:
    """Everything a failed call must leave as it was."""
    return (
        {s: m.block_table(s) for s in m.seq_ids()},
        {s: m.num_released(s) for s in m.seq_ids()},
        counts(m),
        m.eviction_order(),
    )


# -- the operation ---------------------------------------------------------------------


def test_release_counts_blocks_exactly_and_registered_ones_stay_findable():
    m = BlockManager(16, BS)
    m.allocate("a", list(range(18)))  # 5 blocks, the last holds 2 tokens
    table = m.block_table("a")
    assert m.release_before("a", 3) == 0  # block 0 ends at token 4: not entirely before
    assert m.release_before("a", 13) == 3  # blocks 0..2 end at 4, 8, 12 <= 13
    assert m.block_table("a") == [NULL_BLOCK] * 3 + table[3:]
    assert m.num_released("a") == 3
    assert counts(m) == (2, 3, 11)  # used, cached (evictable), free
    assert m.eviction_order() == table[:3]  # oldest block evicted first
    assert m.release_before("a", 13) == 0 and m.release_before("a", 8) == 0  # idempotent
    assert m.release_before("a", 18) == 1  # the partial last block is never released
    assert counts(m) == (1, 4, 11)
    m.check_integrity()
    # A later prompt with the same prefix finds the released blocks in the prefix cache.
    assert m.allocate("b", list(range(17))) == 16
    assert m.block_table("b")[:4] == table[:4]
    m.check_integrity()
    m.free("a")
    m.free("b")
    assert counts(m) == (0, 4, 12)  # both partial last blocks went free
    m.check_integrity()


def test_share_prefix_over_a_released_block_does_not_take_block_0_for_anonymous():
    """A released position's placeholder is NULL_BLOCK, also the id of a real block: the
    source holding real block 0 anonymously further on once made share_prefix list it as
    the new sequence's (check_integrity fired; found by the stateful test)."""
    m = BlockManager(num_blocks=8, block_size=BS)
    m.allocate(1, list(range(8)))
    m.reset_prefix_cache(force=True)  # its blocks in use: unregistered, listed anonymous
    m.release_before(1, 4)  # block 0, unregistered, is free again ...
    m.append(1, list(range(8, 13)))  # ... and taken back for position 2
    m.reset_prefix_cache(force=True)
    assert m.block_table(1) == [NULL_BLOCK, 1, 0, 2] and m.num_released(1) == 1
    m.share_prefix(1, 2, 7)  # the released block, then a copy of the partial one
    assert m.block_table(2)[0] == NULL_BLOCK and m.num_released(2) == 1
    m.check_integrity()
    m.free(2)
    m.free(1)
    m.check_integrity()
    assert m.stats().used_blocks == 0


def test_unregister_skips_released_positions():
    """unregister() of a sequence with released blocks leaves alone the real block 0 that
    another sequence holds (the placeholder has its id)."""
    m = BlockManager(num_blocks=8, block_size=BS)
    m.allocate(2, list(range(100, 108)))  # holds block 0, registered
    m.allocate(1, list(range(8)))
    m.release_before(1, 4)
    assert m.block_table(2)[0] == 0 and m.block_table(1)[0] == NULL_BLOCK
    assert m.unregister(1) == 1  # its one held full block, not block 0
    m.check_integrity()
    assert m.lookup(list(range(100, 109))) == 8  # its blocks, block 0 first, still found


def test_without_prefix_caching_released_blocks_are_free():
    m = BlockManager(8, BS, prefix_caching=False)
    m.allocate("a", list(range(10)))
    assert m.release_before("a", 9) == 2
    assert counts(m) == (1, 0, 7)
    m.append("a", [1] * 7)  # 17 tokens: blocks 3 and 4 are new
    assert len(m.block_table("a")) == 5 and m.block_table("a")[:2] == [NULL_BLOCK] * 2
    table = m.block_table("a")
    assert m.slot_mapping("a", 8) == [table[i // BS] * BS + i % BS for i in range(8, 17)]
    m.check_integrity()
    m.free("a")
    assert counts(m) == (0, 0, 8)


def test_anonymous_blocks_are_freed_not_cached():
    m = BlockManager(16, BS)
    m.allocate("a", list(range(9)))
    m.allocate("b", [99] + list(range(8)))  # own blocks
    m.append("b", [7] * 3)  # b fills its block 2 with tokens 8..11 of a different chain
    m.allocate("c", list(range(5)))  # shares a's block 0 (a hit: cached tokens 4)
    m.append("c", list(range(5, 8)))  # c's block 1 fills with a's content: anonymous
    assert m.num_released("c") == 0
    own = m.block_table("c")[1]
    before_free = m.stats().free_blocks
    assert m.release_before("c", 8) == 2
    assert m.stats().free_blocks == before_free + 1  # the anonymous block went free
    assert own not in m.eviction_order()
    m.check_integrity()
    for s in "abc":
        m.free(s)
    m.check_integrity()


def test_releasing_inside_a_shared_hit_chain_keeps_the_other_holders_whole():
    m = BlockManager(16, BS)
    m.allocate("p", list(range(13)))
    m.free("p")  # 3 full blocks cached
    m.allocate("a", list(range(14)))  # both hit the 3-block chain
    m.allocate("b", list(range(14)))
    chain = m.block_table("a")[:3]
    assert m.release_before("a", 9) == 2
    m.check_integrity()
    assert m.block_table("b")[:3] == chain  # b still holds the whole chain
    assert counts(m) == (5, 0, 11)  # chain blocks stay in use through b
    m.free("b")
    assert counts(m) == (2, 2, 12)  # a holds chain[2] and its own last block
    m.check_integrity()
    m.free("a")
    assert counts(m) == (0, 3, 13)  # the chain is cached again; both last blocks free
    m.check_integrity()


def test_fork_shares_only_held_blocks_and_copy_on_write_still_works():
    m = BlockManager(16, BS)
    m.allocate("a", list(range(14)))  # 4 blocks, last holds 2
    m.release_before("a", 8)
    m.fork("a", "b")
    assert m.num_released("b") == 2 and m.block_table("b") == m.block_table("a")
    m.check_integrity()
    m.append("b", [50])  # shared partial last block: copied on write
    ((src, dst),) = m.take_copies()
    assert src == m.block_table("a")[-1] and dst == m.block_table("b")[-1]
    m.check_integrity()
    assert m.release_before("b", 14) == 1  # b alone lets go of block 2: a still holds it
    assert counts(m) == (3, 2, 11)
    m.check_integrity()
    m.free("a")
    m.free("b")
    assert counts(m) == (0, 3, 13)  # blocks 0..2 cached; both partial last blocks free
    m.check_integrity()


def test_discard_after_release_unregisters_only_held_blocks():
    m = BlockManager(16, BS)
    m.allocate("x", list(range(100, 109)))  # another sequence holds block 0
    m.allocate("a", list(range(13)))
    m.release_before("a", 8)
    m.discard("a")
    assert counts(m) == (3, 2, 11)  # a's 2 released blocks cached; its 2 held ones free
    assert m.lookup(list(range(13))) == 8
    m.check_integrity()


def test_reads_of_a_sequence_with_released_blocks():
    m = BlockManager(16, BS)
    toks = list(range(17))
    m.allocate("a", toks)
    m.release_before("a", 12)
    assert m.block_hashes("a") == m.hash_blocks(toks)  # placeholders hold no hash
    assert m.block_hashes("a", 3) == m.hash_blocks(toks)[3:]
    assert m.token_ids("a") == toks and m.num_tokens("a") == 17
    with pytest.raises(ValueError, match="released outside the sliding window"):
        m.slot_mapping("a", 11)
    assert len(m.slot_mapping("a", 12)) == 5
    assert m.stats().fragmentation == pytest.approx(3 / 8)  # 3 empty slots of 2 used blocks


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("nope", 4), KeyError),
        (("a", -1), ValueError),
        (("a", 11), ValueError),  # past the sequence's 10 tokens
        (("a", 4.0), TypeError),
        (("a", True), TypeError),
    ],
)
def test_bad_release_raises_and_changes_nothing(args, error):
    m = BlockManager(8, BS)
    m.allocate("a", list(range(10)))
    m.release_before("a", 4)
    before = state(m)
    with pytest.raises(error):
        m.release_before(*args)
    assert state(m) == before


def test_allocate_released_takes_only_held_blocks_and_validates_first():
    m = BlockManager(8, BS)
    toks = list(range(18))
    m.allocate_released("a", toks, 3)
    assert counts(m) == (2, 0, 6) and m.num_released("a") == 3
    assert m.block_table("a")[:3] == [NULL_BLOCK] * 3
    assert m.block_hashes("a") == m.hash_blocks(toks)
    m.check_integrity()
    before = state(m)
    for args, error in [
        (("a", toks, 1), ValueError),  # live
        (("b", toks, 5), ValueError),  # 18 tokens have 4 full blocks
        (("b", [], 0), ValueError),
        (("b", toks, -1), ValueError),
        (("b", list(range(40)), 0), Exception),  # 10 blocks > 6 free: OutOfBlocks
        (([1], toks, 0), TypeError),
    ]:
        with pytest.raises(error):
            m.allocate_released(*args)
        assert state(m) == before
    m.append("a", [1, 2])  # 20 tokens: the last block fills and is registered
    m.check_integrity()
    m.free("a")
    assert m.lookup(toks + [1, 2, 3]) == 0  # block 0 of the chain was never registered here
    m.check_integrity()


def test_pressure_callbacks_see_the_release():
    m = BlockManager(4, BS, watermarks=(0.5, 0.7, 0.9))
    levels = []
    m.on_pressure(levels.append)
    m.allocate("a", list(range(16)))  # all 4 blocks in use: CRITICAL
    m.release_before("a", 12)
    assert [lv.name for lv in levels] == ["CRITICAL", "LOW"]


# -- integrity: each planted damage fires ----------------------------------------------


def _windowed() -> BlockManager:
    m = BlockManager(16, BS)
    m.allocate("a", list(range(18)))
    m.release_before("a", 9)  # 2 released, 3 held
    m.allocate("b", list(range(18)))
    m.check_integrity()
    return m


def _raise_released(m):  # claims block 2 (still held) is released
    m._seqs["a"].released = 3


def _lower_released(m):  # a placeholder counted as held
    m._seqs["a"].released = 1


def _real_id_in_placeholder(m):
    m._seqs["a"].blocks[0] = 7


def _released_past_full(m):
    m._seqs["a"].released = 9


def _released_with_chain(m):
    m._seqs["b"].released = 1
    m._seqs["b"].blocks[0] = NULL_BLOCK


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_raise_released, "not NULL_BLOCK"),
        (_lower_released, "ref counts disagree"),
        (_real_id_in_placeholder, "not NULL_BLOCK"),
        (_released_past_full, "released=9 is not in [0, 4]"),
        (_released_with_chain, "released blocks but a hit chain"),
    ],
)
def test_check_integrity_fires_on_damaged_released_state(mutate, message):
    m = _windowed()
    mutate(m)
    with pytest.raises(CacheIntegrityError, match=message.replace("[", r"\[").replace("]", r"\]")):
        m.check_integrity()


# -- KVCache: swap, move, snapshot ------------------------------------------------------


def _cache(**kw) -> KVCache:
    return KVCache(LAYOUT, 16, model_fingerprint="tiny", **kw)


def _write(cache: KVCache, seq_id, start: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    slots = torch.tensor(cache.slot_mapping(seq_id, start), dtype=torch.long)
    for layer in range(LAYOUT.num_layers):
        k, v = (torch.randn(len(slots), 2, 8, generator=gen) for _ in range(2))
        cache.write(layer, slots, k, v)


def _held_kv(cache: KVCache, seq_id) -> torch.Tensor:
    return cache.read_blocks(cache.block_table(seq_id)[cache.num_released(seq_id) :])


def test_kvcache_release_and_swap_round_trip_copies_only_held_blocks():
    cache = _cache(tiers=[CPUTier(1 << 20, swap_bytes=1 << 20)])
    try:
        cache.allocate("a", list(range(18)))
        _write(cache, "a", 0, 1)
        assert cache.release_before("a", 13) == 3
        kv = _held_kv(cache, "a")
        used = cache.manager.num_used_blocks
        cache.swap_out("a")
        assert cache.tiers.stats().swapped_bytes == 2 * LAYOUT.bytes_per_block
        cache.check_integrity()
        cache.swap_in("a")
        assert cache.num_released("a") == 3 and cache.manager.num_used_blocks == used
        assert torch.equal(_held_kv(cache, "a"), kv)
        cache.append("a", [5, 6])
        cache.check_integrity()
        cache.free("a")
        cache.check_integrity()
    finally:
        cache.close()


def test_kvcache_release_errors_and_paused():
    cache = _cache()
    cache.allocate("a", list(range(10)))
    with pytest.raises(KeyError, match="unknown"):
        cache.release_before("b", 4)
    with pytest.raises(KeyError):
        cache.num_released("b")
    with cache.paused(), pytest.raises(Exception, match="paused"):
        cache.release_before("a", 8)
    assert cache.num_released("a") == 0


def test_group_move_of_a_windowed_sequence_copies_its_held_blocks():
    g = KVCacheGroup.create(LAYOUT, [16, 16], ["cpu", "cpu"])
    g.allocate("a", list(range(18)), device="cpu#0")
    _write(g.cache_of("a"), "a", 0, 2)
    assert g.release_before("a", 13) == 3
    kv = _held_kv(g.cache_of("a"), "a")
    moved = g.move("a", "cpu#1")
    assert (moved.blocks_copied, moved.blocks_reused) == (2, 0)
    assert g.num_released("a") == 3 and torch.equal(_held_kv(g.cache_of("a"), "a"), kv)
    assert g.member("cpu#0").manager.num_used_blocks == 0
    g.check_integrity()
    g.close()


def test_snapshot_refuses_a_sequence_with_released_blocks(tmp_path):
    cache = _cache()
    cache.allocate("a", list(range(18)))
    cache.allocate("b", list(range(100, 110)))
    cache.release_before("a", 9)
    with SnapshotStore(tmp_path) as store:
        with pytest.raises(SnapshotError, match="released outside its sliding window"):
            store.save(cache, ["a"], name="w")
        assert store.list() == [] or all(i.name != "w" for i in store.list())
        store.save(cache, ["b"], name="ok")  # others still save
