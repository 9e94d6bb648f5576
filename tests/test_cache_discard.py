"""Dropping a sequence whose KV was never written caches none of it (manager and KVCache).

A failed swap-in or tier load leaves the blocks the sequence registered holding no KV;
if they stayed findable a later prompt would be served their garbage. ``discard``
frees them unregistered, and releases prefix hits (whose KV exists) as ``free`` does.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv import BlockManager, CPUTier, KVCache, KVLayout

BS = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=BS, dtype=torch.float32)
BPB = LAYOUT.bytes_per_block
PROMPT = list(range(1, 14))  # 13 tokens: 3 full blocks + 1 partial


def _fill(cache: KVCache, seq_id: str, seed: int) -> torch.Tensor:
    table = cache.block_table(seq_id)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (len(table), BPB), dtype=torch.uint8, generator=g)
    cache.write_blocks(table, data)
    return data


def _boom(*args: object, **kwargs: object) -> None:
    raise OSError("tier read failed")


# -- BlockManager.discard ----------------------------------------------------------------


def test_discard_frees_what_it_registered_and_caches_its_hits():
    m = BlockManager(16, BS)
    m.allocate("a", PROMPT[:8] + [90])  # blocks 0, 1 registered; 2 partial
    m.free("a")  # 0, 1 cached
    assert m.allocate("n", PROMPT) == 8  # hits 0, 1; registers block 3 (tokens 9..12)
    own = m.block_table("n")[2]
    m.discard("n")
    assert m.lookup(PROMPT) == 8  # the hits stay cached: their KV was written by "a"
    assert own not in m.eviction_order() and m.stats().cached_blocks == 2
    assert m.stats().free_blocks == 14  # its own blocks (3, 4) are free, not cached
    assert m.allocate("again", PROMPT) == 8  # block 3's content is not found again
    assert m.block_table("again")[:2] == [0, 1]
    m.check_integrity()


def test_discard_of_a_fresh_sequence_leaves_every_block_free():
    m = BlockManager(8, BS)
    m.allocate("n", PROMPT)
    m.discard("n")
    s = m.stats()
    assert (s.used_blocks, s.cached_blocks, s.free_blocks) == (0, 0, 8)
    assert m.lookup(PROMPT) == 0 and "n" not in m
    m.check_integrity()


def test_discard_keeps_blocks_another_sequence_holds():
    m = BlockManager(8, BS)
    m.allocate("p", PROMPT)
    m.fork("p", "c")  # c shares every block of p
    m.discard("c")
    assert m.block_table("p") and m.lookup(PROMPT) == 12  # p's blocks stay registered
    m.free("p")
    assert m.lookup(PROMPT) == 12 and m.stats().cached_blocks == 3
    m.check_integrity()


@pytest.mark.parametrize("eviction", ["lru", "fifo", "lfu"])
def test_discard_under_every_policy_and_without_prefix_caching(eviction):
    for prefix_caching in (True, False):
        m = BlockManager(8, BS, eviction=eviction, prefix_caching=prefix_caching)
        m.allocate("n", PROMPT)
        m.discard("n")
        assert m.stats().free_blocks == 8 and m.lookup(PROMPT) == 0
        m.check_integrity()


def test_discard_unknown_id_changes_nothing():
    m = BlockManager(8, BS)
    m.allocate("a", PROMPT)
    with pytest.raises(KeyError, match="zz"):
        m.discard("zz")
    with pytest.raises(TypeError):
        m.discard(["a"])
    assert m.block_table("a") == [0, 1, 2, 3]
    m.check_integrity()


# -- KVCache: failed swap-in ---------------------------------------------------------------


def test_failed_swap_in_leaves_no_registered_block(monkeypatch):
    cache = KVCache(LAYOUT, 8, tiers=[CPUTier(4 * BPB, swap_bytes=8 * BPB)])
    cache.allocate("s", PROMPT)
    data = _fill(cache, "s", 1)
    cache.swap_out("s")
    assert cache.manager.reset_prefix_cache()  # no device copy: swap-in must load all 4
    monkeypatch.setattr(cache.tiers, "swap_in", _boom)
    with pytest.raises(OSError, match="tier read failed"):
        cache.swap_in("s")
    assert cache.lookup(PROMPT) == 0  # the fresh blocks never got their KV: not findable
    s = cache.stats()
    assert (s.used_blocks, s.cached_blocks, s.free_blocks) == (0, 0, 8)
    assert cache.swapped_ids() == ["s"] and "s" not in cache  # still swapped out
    cache.check_integrity()
    monkeypatch.undo()
    cache.swap_in("s")  # the swap area still holds it: a retry restores it bit-exact
    assert torch.equal(cache.read_blocks(cache.block_table("s")), data)
    cache.check_integrity()
    cache.close()


def test_failed_swap_in_keeps_its_valid_prefix_hits_cached(monkeypatch):
    cache = KVCache(LAYOUT, 8, tiers=[CPUTier(4 * BPB, swap_bytes=8 * BPB)])
    cache.allocate("s", PROMPT)
    _fill(cache, "s", 2)
    cache.swap_out("s")  # its 3 full blocks stay cached on the device
    assert cache.lookup(PROMPT) == 12
    monkeypatch.setattr(cache.tiers, "swap_in", _boom)
    with pytest.raises(OSError):
        cache.swap_in("s")  # hits the 3 cached blocks, fails copying the partial one
    assert cache.lookup(PROMPT) == 12  # those hits hold real KV: still cached
    assert cache.stats().cached_blocks == 3 and cache.stats().used_blocks == 0
    cache.check_integrity()
    cache.close()


# -- KVCache: failed load from the tiers at allocate ------------------------------------------


def test_failed_tier_promotion_does_not_create_the_sequence(monkeypatch):
    cache = KVCache(LAYOUT, 4, tiers=[CPUTier(8 * BPB)])
    cache.allocate("a", PROMPT)
    data = _fill(cache, "a", 3)
    cache.free("a")
    cache.allocate("b", list(range(200, 216)))  # the 4-block pool evicts a's blocks
    _fill(cache, "b", 4)
    cache.free("b")
    cache.flush()
    assert cache.lookup(PROMPT) == 0 and cache.tier_stats()["demoted"] == 3
    before = cache.stats().cached_blocks
    monkeypatch.setattr(cache.tiers, "promote", _boom)
    with pytest.raises(OSError, match="tier read failed"):
        cache.allocate("c", PROMPT)
    assert "c" not in cache and cache.seq_ids() == []
    assert cache.lookup(PROMPT) == 0  # c's registered, never-loaded blocks are not findable
    assert cache.stats().used_blocks == 0 and cache.stats().cached_blocks <= before
    cache.check_integrity()
    monkeypatch.undo()
    assert cache.allocate("c", PROMPT) == 12  # the tiers still serve it
    assert torch.equal(cache.read_blocks(cache.block_table("c")[:3]), data[:3])
    cache.check_integrity()
    cache.close()


def test_kvcache_discard_is_the_public_form(monkeypatch):
    cache = KVCache(LAYOUT, 8)
    cache.allocate("n", PROMPT, salt="t")
    cache.discard("n")
    assert cache.lookup(PROMPT, salt="t") == 0 and cache.seq_ids() == []
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.discard("n")
    cache.check_integrity()


@pytest.mark.gpu
def test_failed_swap_in_on_cuda_caches_nothing_and_a_retry_is_bit_exact(monkeypatch):
    layout = KVLayout(num_layers=2, num_kv_heads=8, head_dim=128, block_size=16,
                      dtype=torch.bfloat16)  # fmt: skip
    bpb = layout.bytes_per_block
    cache = KVCache(layout, 32, device="cuda", tiers=[CPUTier(64 * bpb, swap_bytes=64 * bpb)])
    prompt = list(range(10 * 16 + 3))
    cache.allocate("s", prompt)
    table = cache.block_table("s")
    data = torch.randint(0, 256, (len(table), bpb), dtype=torch.uint8)
    cache.write_blocks(table, data)
    cache.swap_out("s")
    assert cache.manager.reset_prefix_cache()
    monkeypatch.setattr(cache.tiers, "swap_in", _boom)
    with pytest.raises(OSError):
        cache.swap_in("s")
    assert cache.lookup(prompt) == 0 and cache.stats().cached_blocks == 0
    monkeypatch.undo()
    cache.swap_in("s")
    assert torch.equal(cache.read_blocks(cache.block_table("s")), data)
    cache.check_integrity()
    cache.close()


# -- snapshot restore failing midway -----------------------------------------------------


def test_failed_snapshot_load_leaves_the_cache_as_it_was(tmp_path, monkeypatch):
    from pagedkv import SnapshotStore

    src = KVCache(LAYOUT, 16)
    for i, sid in enumerate(("a", "b", "c")):
        src.allocate(sid, [100 * (i + 1) + t for t in range(13)])
        _fill(src, sid, 10 + i)
    store = SnapshotStore(tmp_path / "snaps")
    store.save(src, name="snap")
    dst = KVCache(LAYOUT, 16)
    dst.allocate("own", PROMPT)
    _fill(dst, "own", 3)

    def state():  # what the cache holds (the activity counters count the attempt)
        s = dst.stats()
        blocks = (s.used_blocks, s.cached_blocks, s.free_blocks, s.pinned_blocks)
        return blocks, dst.seq_ids(), dst.block_table("own"), dst.lookup(PROMPT)

    before = state()
    real, calls = dst.write_blocks, []

    def failing(ids, data):
        calls.append(1)
        if len(calls) == 2:  # the second sequence's write: one sequence installed already
            raise OSError("device write failed")
        return real(ids, data)

    monkeypatch.setattr(dst, "write_blocks", failing)
    with pytest.raises(OSError, match="device write failed"):
        store.load(dst, "snap")
    assert state() == before
    for i in range(3):  # nothing of the snapshot is findable: no block without its KV
        assert dst.lookup([100 * (i + 1) + t for t in range(13)]) == 0
    dst.check_integrity()
    monkeypatch.undo()
    store.load(dst, "snap")  # a retry restores every sequence (full blocks compared: a
    # snapshot keeps only the written slots of a partial block)
    assert torch.equal(
        dst.read_blocks(dst.block_table("snap:b")[:3]), src.read_blocks(src.block_table("b")[:3])
    )
    dst.check_integrity()
