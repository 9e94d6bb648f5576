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
