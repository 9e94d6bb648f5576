"""Offload tiers with the pool on CUDA: stream-ordered copies, bit-exact (GPU only)."""

from __future__ import annotations

import pytest
import torch

from pagedkv import CPUTier, DiskTier, KVCache, KVLayout

pytestmark = pytest.mark.gpu


def cuda_cache(num_blocks: int, tiers) -> KVCache:
    layout = KVLayout(
        num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16
    )
    return KVCache(layout, num_blocks, device="cuda", tiers=tiers)


def fill(cache: KVCache, seq_id) -> None:
    n = cache.num_tokens(seq_id)
    slots = torch.tensor(cache.slot_mapping(seq_id), device="cuda")
    for layer in range(cache.layout.num_layers):
        k = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16)
        cache.write(layer, slots, k, -k)


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_evicted_prefix_comes_back_bit_exact(kind, tmp_path):
    bpb = 4 * 2 * 16 * 8 * 128 * 2
    tier = CPUTier(512 * bpb) if kind == "cpu" else DiskTier(tmp_path / "kv", 512 * (bpb + 64))
    cache = cuda_cache(64, [tier])
    prompt = list(range(40 * 16 + 1))  # 40 full blocks
    cache.allocate("a", prompt)
    fill(cache, "a")
    before = cache.read_blocks(cache.block_table("a")[:40]).clone()
    cache.free("a")
    for i in range(4):  # unrelated traffic evicts every cached block of "a"
        cache.allocate(f"x{i}", [7 + i] * (20 * 16))
        fill(cache, f"x{i}")  # overwrite the evicted blocks right away
        cache.free(f"x{i}")
    assert cache.manager.lookup(prompt) == 0
    assert cache.allocate("b", prompt) == 40 * 16
    after = cache.read_blocks(cache.block_table("b")[:40])
    assert torch.equal(before, after)
    cache.check_integrity()
    cache.close()


def test_swap_out_in_bit_exact_on_cuda():
    cache = cuda_cache(64, [CPUTier(256 * 4 * 2 * 16 * 8 * 128 * 2)])
    cache.allocate("s", list(range(30 * 16 + 5)))
    fill(cache, "s")
    before = cache.read_blocks(cache.block_table("s")).clone()
    cache.swap_out("s")
    cache.allocate("other", [3] * (60 * 16))  # takes the freed blocks
    fill(cache, "other")
    cache.free("other")
    cache.swap_in("s")
    assert torch.equal(cache.read_blocks(cache.block_table("s")), before)
    cache.check_integrity()
    cache.close()


def test_persist_from_a_cuda_pool_then_a_new_cache_hits_bit_exact(tmp_path):
    """close(persist=True) gathers cached blocks off the GPU (stream-ordered, waited on)
    into the disk tier; a new CUDA cache on the same directory loads them bit-exact."""
    bpb = 4 * 2 * 16 * 8 * 128 * 2
    tiers = [CPUTier(8 * bpb), DiskTier(tmp_path / "kv", 256 * (bpb + 64))]
    a = cuda_cache(64, tiers)
    prompts = {f"p{i}": [i] * 16 + list(range(i * 1000, i * 1000 + 20 * 16 + 1)) for i in range(3)}
    before = {}
    for sid, toks in prompts.items():  # 3 x 21 full blocks: some spill to the CPU tier
        a.allocate(sid, toks)
        fill(a, sid)
        before[sid] = a.read_blocks(a.block_table(sid)[:21]).clone()
        a.free(sid)
    a.close(persist=True)
    assert a.tier_stats()["persisted"] == 63
    b = cuda_cache(64, tiers)
    for sid, toks in prompts.items():
        assert b.allocate(sid, toks) == 21 * 16, sid
        assert torch.equal(b.read_blocks(b.block_table(sid)[:21]), before[sid]), sid
        b.free(sid)
    b.check_integrity()
    b.close()
