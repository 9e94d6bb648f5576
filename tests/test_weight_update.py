"""Weight updates: set_model_fingerprint in O(1), and no KV of the old fingerprint is ever
used again, from the device, the CPU and disk tiers, swap or snapshots."""

from __future__ import annotations

import time

import pytest
import torch

from pagedkv import BlockManager, CachePausedError, KVCache, KVLayout
from pagedkv.errors import SnapshotError
from pagedkv.events import AllBlocksCleared
from pagedkv.snapshot import SnapshotStore
from pagedkv.tiers import CPUTier, DiskTier

BS = 4
A, B, C = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
P = A + B + C + [13]
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=BS, dtype=torch.float32)
BPB = LAYOUT.bytes_per_block
OTHER = list(range(100, 116))


def fill(cache: KVCache, seq_id, value: float) -> None:
    slots = torch.tensor(cache.slot_mapping(seq_id), dtype=torch.long)
    kv = torch.full((len(slots), 1, 4), value)
    cache.write(0, slots, kv, kv)


def best_of(fn, n: int = 5) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.mark.slow
def test_set_model_fingerprint_is_o1_in_the_blocks_cached():
    tiny = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, block_size=1, dtype=torch.float16)
    took = {}
    for n in (10**3, 10**6):
        cache = KVCache(tiny, n + 1)
        cache.allocate("s", list(range(n)))  # n registered blocks, then all cached
        cache.free("s")
        assert cache.stats().cached_blocks == n
        took[n] = best_of(lambda i, c=cache: c.set_model_fingerprint(f"step-{i}"))
        assert cache.stats().invalidated_blocks == n and cache.lookup(list(range(n))) == 0
    # O(n) would be ~1000x; a generous bound for a loaded 2-core box
    assert took[10**6] < 10 * took[10**3] + 1e-4, took
    assert took[10**6] < 5e-3, took  # measured ~12-20 µs here


@pytest.mark.parametrize("where", ["device", "cpu", "disk"])
def test_a_repeated_prompt_gets_nothing_computed_under_the_old_fingerprint(where, tmp_path):
    tiers = {
        "device": None,
        "cpu": [CPUTier(16 * BPB)],
        "disk": [CPUTier(BPB), DiskTier(tmp_path, 64 * (BPB + 256))],  # spills to disk
    }[where]
    cache = KVCache(LAYOUT, 4, model_fingerprint="policy@1", tiers=tiers)
    cache.allocate("a", P)
    fill(cache, "a", 1.0)
    cache.free("a")
    if where != "device":
        cache.allocate("o", OTHER)  # evicts P's blocks into the tiers
        cache.free("o")
        r = cache.explain(P)
        assert r.cached_tokens == 12 and r.blocks[-1] == f"tier:{where}", r.blocks
    assert cache.lookup(P) == (12 if where == "device" else 0)
    old_keys = [cache.tiers.key(h) for h in cache.manager.hash_blocks(P)] if tiers else []

    assert cache.set_model_fingerprint("policy@2") is True
    assert cache.model_fingerprint == "policy@2"
    r = cache.explain(P)
    assert r.blocks == ("never_seen",) * 3 and r.cached_tokens == 0
    assert cache.allocate("b", P) == 0
    if where != "device":  # the old entries are still there, under keys nobody asks for
        level = cache.tiers.levels[-1]
        assert level.contains(old_keys[-1:]) == [True]
    cache.check_integrity()
    cache.close()


def test_old_blocks_stay_cached_unmatchable_and_are_evicted_lazily():
    cache = KVCache(LAYOUT, 6)
    cache.allocate("a", P)
    cache.free("a")
    assert cache.stats().invalidated_blocks == 0
    cache.set_model_fingerprint("v2")
    s = cache.stats()
    assert (s.cached_blocks, s.invalidated_blocks) == (3, 3)  # nothing was touched
    cache.allocate("b", [50] * 9)  # 3 blocks: 3 free ones, no eviction yet
    assert cache.stats().invalidated_blocks == 3
    cache.allocate("c", [60] * 9)  # 3 more: the old blocks are reclaimed
    s = cache.stats()
    assert (s.invalidated_blocks, s.cached_blocks, s.evictions) == (0, 0, 3)
    cache.check_integrity()
    cache.free("b")
    assert cache.allocate("b2", [50] * 9) == 8  # the new model's blocks are shared as usual


def test_live_sequences_keep_their_kv_but_cache_nothing_they_fill_later():
    m = BlockManager(16, BS, extra_keys=("v1",))
    m.allocate("old", A + [5])  # A registered under v1, a partial block
    assert m.set_extra_keys(("v2",)) is True
    assert m.generation == 1 and m.generation_of("old") == 0
    m.append("old", [6, 7, 8] + C)  # fills [5..8] and C: KV mixing two models
    m.fork("old", "fork")
    m.append("fork", [1, 1, 1, 1])
    assert m.stats().invalidated_blocks == 1  # only A, registered before the change
    assert m.lookup(A + B + C + [1]) == 0
    m.set_extra_keys(("v1",))  # back to v1: A holds v1's KV and matches again
    assert m.lookup(A + B + C + [1]) == 4  # but not what "old" filled after the change
    assert m.stats().invalidated_blocks == 0
    m.check_integrity()
    m.free("old")
    m.free("fork")
    m.check_integrity()
    assert m.set_extra_keys(["v1"]) is False  # the current keys: nothing changes
    with pytest.raises(TypeError, match="extra_keys"):
        m.set_extra_keys((1.5,))
    assert m.generation == 2 and m.config.extra_keys == ("v1",)
    m.check_integrity()


def test_a_sequence_swapped_out_before_comes_back_sharing_nothing():
    cache = KVCache(LAYOUT, 8, tiers=[CPUTier(4 * BPB, swap_bytes=8 * BPB)])
    cache.allocate("s", P)
    fill(cache, "s", 3.0)
    data = cache.read_blocks(cache.block_table("s")).clone()
    cache.swap_out("s")  # its full blocks stay cached on the device, under v0
    cache.set_model_fingerprint("v1")
    cache.swap_in("s")
    assert torch.equal(cache.read_blocks(cache.block_table("s")), data)  # bit-exact
    assert cache.manager.generation_of("s") == -1
    cache.append("s", [1, 2, 3])  # fills a block: never registered
    assert cache.lookup(P + [1, 2, 3, 0]) == 0
    cache.check_integrity()
    cache.free("s")
    assert cache.allocate("t", P) == 0
    cache.check_integrity()
    cache.close()


def test_pins_move_to_the_same_tokens_under_the_new_fingerprint():
    m = BlockManager(8, BS, extra_keys=("v1",))
    m.allocate("a", A + B + [1], salt="t")
    m.pin(A + B, salt="t")
    m.free("a")
    assert m.stats().pinned_blocks == 2
    m.set_extra_keys(("v2",))
    assert m.stats().pinned_blocks == 0  # the old blocks became evictable
    m.allocate("b", A + B + [1], salt="t")  # recomputed under v2
    m.free("b")
    assert m.stats().pinned_blocks == 2  # held: the pin follows the tokens
    m.check_integrity()
    assert m.unpin(A + B, salt="t") == 2
    assert m.stats().pinned_blocks == 0
    m.check_integrity()


def test_snapshots_of_the_old_fingerprint_are_refused(tmp_path):
    cache = KVCache(LAYOUT, 16, model_fingerprint="policy@1")
    cache.allocate("a", P)
    fill(cache, "a", 2.0)
    with SnapshotStore(tmp_path) as store:
        store.save(cache, name="before")
        cache.free("a")
        cache.set_model_fingerprint("policy@2")
        with pytest.raises(SnapshotError, match="fingerprint"):
            store.load(cache, "before")
        cache.check_integrity()


def test_events_errors_and_pauses():
    cache = KVCache(LAYOUT, 8)
    batches: list[list] = []
    cache.subscribe(batches.append)
    assert cache.set_model_fingerprint("") is False and batches == []  # the current one
    assert cache.set_model_fingerprint("v2") is True
    assert batches == [[AllBlocksCleared("device")]]
    before = (cache.fingerprint, cache.manager.generation)
    with pytest.raises(TypeError, match="model_fingerprint"):
        cache.set_model_fingerprint(2)  # type: ignore[arg-type]
    with cache.paused(), pytest.raises(CachePausedError, match="set_model_fingerprint"):
        cache.set_model_fingerprint("v3")
    assert (cache.fingerprint, cache.manager.generation) == before
    assert "v2" not in cache.fingerprint  # a digest of it: the layout and the model
