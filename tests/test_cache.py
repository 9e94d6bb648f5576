"""KVCache: the manager and the pool kept in step (CoW copies executed, fingerprints)."""

from __future__ import annotations

import pytest
import torch

from pagedkv import KVCache, KVLayout, OutOfBlocks, PagedKVError


def layout(block_size: int = 4) -> KVLayout:
    return KVLayout(
        num_layers=2, num_kv_heads=2, head_dim=8, block_size=block_size, dtype=torch.float32
    )


def fill(cache: KVCache, seq_id, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write random K/V for tokens start..stop of seq_id in every layer; return layer 0's."""
    slots = torch.tensor(cache.slot_mapping(seq_id, start, stop))
    out = None
    for layer in range(cache.layout.num_layers):
        k = torch.randn(stop - start, 2, 8)
        v = torch.randn(stop - start, 2, 8)
        cache.write(layer, slots, k, v)
        out = out or (k, v)
    return out


def test_cow_copy_is_executed_and_parent_untouched():
    cache = KVCache(layout(), 16)
    cache.allocate("p", list(range(6)))
    fill(cache, "p", 0, 6)
    cache.fork("p", "c")
    before_parent = [cache.pool.gather(layer, cache.block_table("p"), 6) for layer in (0, 1)]
    cache.append("c", [99])  # last block (2 of 4 slots used) is shared -> copied on write
    assert cache.block_table("c")[:1] == cache.block_table("p")[:1]
    assert cache.block_table("c")[1] != cache.block_table("p")[1]
    for layer in (0, 1):
        kc, vc = cache.pool.gather(layer, cache.block_table("c"), 6)
        kp, vp = before_parent[layer]
        assert torch.equal(kc, kp) and torch.equal(vc, vp)
    # writing the child's new token leaves the parent's bytes as they were
    fill(cache, "c", 6, 7)
    for layer in (0, 1):
        kp, vp = cache.pool.gather(layer, cache.block_table("p"), 6)
        assert torch.equal(kp, before_parent[layer][0])
    assert cache.manager.take_copies() == []  # the cache consumed them
    cache.check_integrity()


def test_prefix_hit_reads_the_same_kv():
    cache = KVCache(layout(), 16)
    prompt = list(range(13))
    assert cache.allocate("a", prompt) == 0
    k, _ = fill(cache, "a", 0, 13)
    cache.free("a")
    assert cache.allocate("b", prompt + [5, 6]) == 12
    kb, _ = cache.pool.gather(0, cache.block_table("b"), 12)
    assert torch.equal(kb, k[:12])
    cache.check_integrity()


def test_model_fingerprint_isolates_prefixes():
    a = KVCache(layout(), 16, model_fingerprint="model-a")
    b = KVCache(layout(), 16, model_fingerprint="model-b")
    prompt = list(range(9))
    assert a.manager.hash_blocks(prompt) != b.manager.hash_blocks(prompt)
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint.startswith("L2-H2-D8-B4-float32")


def test_block_tables_tensor_pads_and_checks_width():
    cache = KVCache(layout(), 16)
    cache.allocate(1, list(range(9)))
    cache.allocate(2, list(range(100, 103)))
    t = cache.block_tables_tensor([1, 2])
    assert t.dtype == torch.int32 and t.shape == (2, 3)
    assert t[0].tolist() == cache.block_table(1)
    assert t[1].tolist() == cache.block_table(2) + [0, 0]
    assert cache.block_tables_tensor([1, 2], width=5).shape == (2, 5)
    with pytest.raises(ValueError, match="width=2"):
        cache.block_tables_tensor([1, 2], width=2)


def test_decode_matches_dense_attention():
    cache = KVCache(layout(), 16)
    cache.allocate("s", list(range(7)))
    k, v = fill(cache, "s", 0, 7)
    q = torch.randn(1, 4, 8)  # GQA: 4 query heads over 2 KV heads
    out = cache.decode(q, 0, cache.block_tables_tensor(["s"]), torch.tensor([7], dtype=torch.int32))
    kk = k.repeat_interleave(2, dim=1).transpose(0, 1)  # [Hq, N, D]
    vv = v.repeat_interleave(2, dim=1).transpose(0, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv)
    torch.testing.assert_close(out, ref.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_paused_refuses_mutation_and_changes_nothing():
    cache = KVCache(layout(), 16)
    cache.allocate("s", list(range(5)))
    with cache.paused():
        with pytest.raises(PagedKVError, match="paused"):
            cache.append("s", [1])
        with pytest.raises(PagedKVError, match="paused"):
            cache.free("s")
    assert cache.num_tokens("s") == 5
    cache.append("s", [1])
    assert cache.num_tokens("s") == 6


def test_out_of_blocks_leaves_cache_unchanged():
    cache = KVCache(layout(), 4)
    cache.allocate("a", list(range(12)))
    table, free = cache.block_table("a"), cache.num_free_blocks
    with pytest.raises(OutOfBlocks):
        cache.allocate("b", list(range(100, 108)))
    assert cache.block_table("a") == table and cache.num_free_blocks == free
    assert "b" not in cache
    cache.check_integrity()


def test_bad_construction():
    with pytest.raises(TypeError, match="KVLayout"):
        KVCache("not a layout", 4)
    with pytest.raises(TypeError, match="model_fingerprint"):
        KVCache(layout(), 4, model_fingerprint=3)
    with pytest.raises(TypeError, match="on_evict"):
        KVCache(layout(), 4, on_evict=print)
    with pytest.raises(ValueError, match="eviction"):
        KVCache(layout(), 4, eviction="random")
    with pytest.raises(PagedKVError, match="tiers"):
        cache = KVCache(layout(), 4)
        cache.allocate("a", [1, 2])
        cache.swap_out("a")


def test_write_through_copies_hit_blocks_to_the_tiers():
    from pagedkv import CPUTier

    lay = layout()
    cache = KVCache(lay, 16, tiers=[CPUTier(64 * lay.bytes_per_block)], write_through=True)
    prompt = list(range(13))  # 3 full blocks of 4
    cache.allocate("a", prompt)
    fill(cache, "a", 0, 13)
    assert cache.allocate("b", prompt) == 12  # device hit on 3 blocks -> written through
    cache.flush()
    assert cache.tier_stats()["written_through"] == 3
    # Another cache with the same fingerprint and tiers object would now find them; here,
    # drop the device copies and check the promotion brings back the same bytes.
    before = cache.pool.gather(0, cache.block_table("a"), 12)
    cache.free("a")
    cache.free("b")
    assert cache.manager.reset_prefix_cache()
    assert cache.allocate("c", prompt) == 12  # all three blocks promoted from the CPU tier
    after = cache.pool.gather(0, cache.block_table("c"), 12)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    cache.check_integrity()
    cache.close()
