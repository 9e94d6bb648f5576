"""KVCache's side of the prefix limits: share_prefix (the copy runs on the pool), private
requests and the tiers, evict(n) and caps demoting to the tiers, gc(), seq_stats bytes.

Block size 4; a fresh pool hands out block 0, 1, 2, ... in order.
"""

from __future__ import annotations

import time

import pytest
import torch

from pagedkv import CachePausedError, KVCache, KVLayout
from pagedkv.manager import ManagerConfig
from pagedkv.stores.framing import HEADER_BYTES
from pagedkv.tiers import CPUTier, DiskTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32)
BPB = LAYOUT.bytes_per_block
P = list(range(1, 13))  # 3 full blocks


def fill_random(cache: KVCache, seq_id) -> torch.Tensor:
    table = cache.block_table(seq_id)
    data = torch.randint(0, 256, (len(table), BPB), dtype=torch.uint8)
    cache.write_blocks(table, data)
    return data


def demoted(cache: KVCache) -> int:
    cache.flush()
    return cache.tier_stats()["demoted"]


def test_share_prefix_shares_full_blocks_and_copies_the_partial_one_on_the_pool():
    cache = KVCache(LAYOUT, 16)
    cache.allocate("a", P + [13, 14], salt="t")
    data = fill_random(cache, "a")
    cache.share_prefix("a", "d", 9)
    assert cache.block_table("d") == [0, 1, 4] and cache.salt("d") == "t"
    assert torch.equal(cache.read_blocks([4]), data[2:3])  # block 2's bytes, copied
    assert cache.manager.take_copies() == []  # the cache ran the copy itself
    cache.write_blocks([4], torch.zeros(1, BPB, dtype=torch.uint8))  # d's writes are its own
    assert torch.equal(cache.read_blocks(cache.block_table("a")), data)
    s = cache.seq_stats("d")
    assert (s.blocks, s.shared_blocks, s.tokens, s.bytes) == (3, 2, 9, 3 * BPB)
    assert cache.seq_stats("a").bytes == 4 * BPB
    cache.check_integrity()


def test_share_prefix_refusals_change_nothing():
    cache = KVCache(LAYOUT, 16, tiers=[CPUTier(16 * BPB)])
    cache.allocate("a", P + [13])
    cache.allocate("s", [1, 2, 3])
    cache.swap_out("s")
    with pytest.raises(ValueError, match="'s' is swapped out; share into a new id"):
        cache.share_prefix("a", "s", 5)
    with pytest.raises(KeyError, match="'s' is swapped out; swap_in"):
        cache.share_prefix("s", "n", 2)
    with pytest.raises(KeyError, match="unknown sequence 'x'"):
        cache.share_prefix("x", "n", 2)
    with pytest.raises(ValueError, match="num_tokens"):
        cache.share_prefix("a", "n", 14)
    with cache.paused(), pytest.raises(CachePausedError):
        cache.share_prefix("a", "n", 4)
    assert cache.seq_ids() == ["a"] and cache.swapped_ids() == ["s"]
    cache.check_integrity()
    cache.close()


def test_a_private_request_gets_no_tier_hit_and_is_never_demoted():
    cache = KVCache(LAYOUT, 16, tiers=[CPUTier(16 * BPB)])
    cache.allocate("pub", P + [0])
    cache.free("pub")
    assert cache.evict(3) == 3 and demoted(cache) == 3  # P's blocks now only in the tier
    lookups = cache.tier_stats()["lookups"]
    assert cache.allocate("priv", P + [0], share_prefix=False) == 0
    assert cache.tier_stats()["lookups"] == lookups  # the tiers were not even asked
    cache.swap_out("priv")
    cache.swap_in("priv")  # stays private across a swap
    assert not cache.manager.shares_prefix("priv")
    cache.free("priv")
    assert cache.evict(10) == 0 and demoted(cache) == 3  # its blocks were freed, not cached
    assert cache.allocate("again", P + [0]) == 12  # the public copy, from the tier
    cache.check_integrity()
    cache.close()


def test_evict_and_the_cap_demote_to_the_tiers():
    cache = KVCache(LAYOUT, 16, tiers=[CPUTier(16 * BPB)], max_cached_blocks=1)
    assert cache.manager.max_cached_blocks == 1
    cache.allocate("a", P + [0])
    cache.free("a")  # 2, 1 evicted over the cap (tail first), 0 stays cached
    assert demoted(cache) == 2 and cache.manager.eviction_order() == [0]
    cache.check_integrity()  # nothing evicted is left undemoted
    assert cache.evict(5) == 1 and demoted(cache) == 3
    assert cache.allocate("b", P + [9]) == 12  # all three blocks loaded back from the tier
    assert cache.tier_stats()["tier_hit_tokens"] == 12
    with cache.paused(), pytest.raises(CachePausedError):
        cache.evict(1)
    cache.close()


def test_min_prefix_tokens_from_the_config_or_a_keyword():
    assert KVCache(LAYOUT, 8, min_prefix_tokens=6).manager.min_prefix_tokens == 6
    base = ManagerConfig(min_prefix_tokens=6, max_cached_blocks=3)
    cache = KVCache(LAYOUT, 8, manager=base, min_prefix_tokens=2)
    assert (cache.manager.min_prefix_tokens, cache.manager.max_cached_blocks) == (2, 3)
    with pytest.raises(ValueError, match="max_cached_blocks"):
        KVCache(LAYOUT, 8, max_cached_blocks=-1)


def test_gc_drops_expired_blocks_and_reports_bytes():
    cache = KVCache(LAYOUT, 16, ttl_seconds=0.05)
    cache.allocate("a", P + [0])
    cache.free("a")  # 3 cached
    time.sleep(0.1)  # idle longer than the TTL
    g = cache.gc()
    assert (g.blocks_freed, g.bytes_freed, g.tier_entries_freed) == (3, 3 * BPB, 0)
    assert g.seconds >= 0 and cache.stats().free_blocks == 16
    assert cache.gc().blocks_freed == 0
    with cache.paused(), pytest.raises(CachePausedError):
        cache.gc()


def test_gc_deletes_tier_entries_over_capacity_written_by_another_cache(tmp_path):
    entry = BPB + HEADER_BYTES
    caches = [KVCache(LAYOUT, 16, tiers=[DiskTier(tmp_path / "kv", 4 * entry)]) for _ in range(2)]
    for i, cache in enumerate(caches):  # each demotes 3 blocks of its own prompt
        cache.allocate("x", list(range(100 * i, 100 * i + 12)) + [0])
        cache.free("x")
        assert cache.evict(3) == 3 and demoted(cache) == 3
    on_disk = caches[0].tiers.levels[0].store.keys(caches[0].tiers.key_prefix)
    assert len(list(on_disk)) == 6  # each store knows its own 3 entries, within its 4
    g = caches[0].gc()
    assert (g.blocks_freed, g.bytes_freed, g.tier_entries_freed) == (0, 0, 2)
    assert caches[1].gc().tier_entries_freed == 0
    for cache in caches:
        cache.check_integrity()
        cache.close()
