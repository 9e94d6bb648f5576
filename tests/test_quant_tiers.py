"""Tiers in a compressed format: a bf16 pool with fp8 / int8 tiers (demote quantizes,
promote dequantizes), a quantized pool through the tiers bit-exactly (bytes and scales),
and the errors of a bad tier format."""

from __future__ import annotations

import pytest
import torch

from _tiercases import hashes
from pagedkv import KVCache
from pagedkv.storage import KVLayout, KVPool, convert_rows
from pagedkv.tiers import CPUTier, DiskTier, TieredStore

BF16 = torch.bfloat16
LAYOUT = KVLayout(2, 2, 8, 4, BF16)
# error bound against the block-head max of one rounding onto the grid (fp8 e4m3 keeps 3
# mantissa bits: half an ulp is 2**-4 of the value; int8: half of a step of max/127), plus
# the bf16 rounding of the dequantized value (half an ulp: 2**-8 of it)
BOUND = {"fp8": 2.0**-4 + 2.0**-8, "int8": 0.5 / 127 + 2.0**-8}
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (unseeded draws included)."""
    torch.manual_seed(0)


def random_pool(layout: KVLayout, nb: int = 16, seed: int = 0) -> KVPool:
    """A pool whose every block holds random K/V (written through the pool: a quantized
    pool gets real scales)."""
    g = torch.Generator().manual_seed(seed)
    pool = KVPool(layout, nb)
    slots = torch.arange(nb * layout.block_size)
    for layer in range(layout.num_layers):
        k = torch.randn(len(slots), 2, 8, generator=g).to(BF16) * (1 + layer)
        pool.write(layer, slots, k, torch.randn(len(slots), 2, 8, generator=g).to(BF16))
    return pool


def values(pool: KVPool, ids: list[int]) -> torch.Tensor:
    """The blocks' K/V as float32 (dequantized when the pool is quantized)."""
    return torch.stack(
        [torch.stack(pool.gather(layer, ids, len(ids) * pool.layout.block_size)).float()
         for layer in range(pool.layout.num_layers)]
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_bf16_pool_with_a_compressed_tier(fmt, kind, tmp_path):
    """Demote quantizes, promote dequantizes: the promoted K/V are within one rounding of
    the format (per block and head max) of what was demoted; the tier holds half the bytes
    of a bf16 tier plus the scales (tier_stats shows them)."""
    pool = random_pool(LAYOUT)
    cap = 64 * LAYOUT.bytes_per_block
    tier = CPUTier(cap, kv_dtype=fmt) if kind == "cpu" else DiskTier(tmp_path, cap, kv_dtype=fmt)
    ts = TieredStore([tier], LAYOUT, "m")
    ts.attach(pool)
    ids, hs = [0, 1, 2, 3, 4, 5], hashes(6)
    before = values(pool, ids)
    ts.demote(list(zip(ids, hs)))
    ts.flush()
    pool.kv.fill_(-7.0)  # the pool's next tenants
    assert ts.promote(hs, [10, 11, 12, 13, 14, 15]) == 6
    after = values(pool, [10, 11, 12, 13, 14, 15])
    # [L, 2 (k, v), tokens, H, D] -> max per (layer, k/v, block, head)
    amax = before.abs().unflatten(2, (6, 4)).amax(dim=(3, 5), keepdim=True)
    err = (after - before).abs().unflatten(2, (6, 4))
    assert bool((err <= amax * BOUND[fmt] * 1.001).all())
    assert not torch.equal(after, before)  # it really went through the compressed format
    st = ts.stats()
    small = LAYOUT.with_kv_dtype(fmt)
    assert st["kv_dtype"] == str(small.kv_dtype).removeprefix("torch.")
    assert st["block_bytes"] == small.bytes_per_block
    assert small.payload_bytes * 2 == LAYOUT.bytes_per_block  # half of bf16, plus scales
    if kind == "cpu":
        assert st["tiers"]["cpu"]["bytes_used"] == 6 * small.bytes_per_block
    ts.close()


def test_quantized_pool_round_trips_bit_exact_through_the_tiers(tmp_path):
    """An fp8 pool's blocks demote and promote with their bytes and scales unchanged, through
    the CPU tier and spilled to disk."""
    lay = LAYOUT.with_kv_dtype("fp8")
    pool = random_pool(lay)
    ts = TieredStore([CPUTier(2 * lay.bytes_per_block), DiskTier(tmp_path, 1 << 20)], lay, "m")
    ts.attach(pool)
    ids, hs = [0, 1, 2, 3, 4], hashes(5)
    before = pool.read_blocks(ids).clone()
    for i, h in zip(ids, hs):  # one at a time: the CPU tier spills its oldest to disk
        ts.demote([(i, h)])
        ts.flush()
    assert ts.stats()["tiers"]["cpu"]["spilled"] >= 3
    pool.kv.zero_()
    pool.scales.zero_()
    assert ts.promote(hs, [8, 9, 10, 11, 12]) == 5
    assert torch.equal(pool.read_blocks([8, 9, 10, 11, 12]), before)
    ts.close()


def test_a_compressed_tier_under_a_kvcache_serves_prefix_hits():
    """KVCache with a bf16 pool and an fp8 CPU tier: an evicted prefix comes back from the
    tier (tier_hit_tokens), dequantized within the fp8 bound."""
    cache = KVCache(LAYOUT, 4, tiers=[CPUTier(1 << 20, kv_dtype="fp8")])
    g = torch.Generator().manual_seed(1)
    tokens = list(range(16))
    cache.allocate("a", tokens)
    slots = torch.tensor(cache.slot_mapping("a"))
    for layer in range(2):
        k = torch.randn(16, 2, 8, generator=g).to(BF16)
        cache.write(layer, slots, k, k * 0.5)
    before = values(cache.pool, cache.block_table("a"))
    cache.free("a")
    cache.allocate("b", list(range(100, 116)))  # takes every block: "a"'s are evicted
    cache.free("b")
    cache.tiers.flush()
    cache.allocate("a2", tokens)
    st = cache.tier_stats()
    assert st["tier_hit_tokens"] > 0 and st["kv_dtype"] == "float8_e4m3fn"
    hit = st["tier_hit_tokens"] // 4
    after = values(cache.pool, cache.block_table("a2")[:hit])
    ref = before.unflatten(2, (4, 4))[:, :, :hit].flatten(2, 3)
    amax = ref.abs().unflatten(2, (hit, 4)).amax(dim=(3, 5), keepdim=True)
    err = (after - ref).abs().unflatten(2, (hit, 4))
    assert bool((err <= amax * BOUND["fp8"] * 1.001).all())
    cache.check_integrity()
    cache.close()


def test_swap_stays_in_the_pool_format():
    """Swapped-out sequences are not compressed by a compressed tier: bit-exact."""
    cache = KVCache(LAYOUT, 8, tiers=[CPUTier(1 << 20, kv_dtype="int8")])
    cache.allocate("s", list(range(10)))
    slots = torch.tensor(cache.slot_mapping("s"))
    g = torch.Generator().manual_seed(2)
    for layer in range(2):
        cache.write(layer, slots, *torch.randn(2, 10, 2, 8, generator=g).to(BF16))
    before = cache.read_blocks(cache.block_table("s")).clone()
    cache.swap_out("s")
    cache.manager.reset_prefix_cache()
    cache.pool.kv.zero_()
    cache.swap_in("s")
    assert torch.equal(cache.read_blocks(cache.block_table("s")), before)
    cache.close()


def test_tier_formats_are_checked():
    with pytest.raises(ValueError, match="unknown CPUTier: kv_dtype"):
        CPUTier(1 << 20, kv_dtype="fp4")
    with pytest.raises(TypeError, match="kv_dtype"):
        CPUTier(1 << 20, kv_dtype=8)
    assert CPUTier(1 << 20, kv_dtype="fp8").kv_dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="different formats"):
        TieredStore([CPUTier(1 << 20, kv_dtype="fp8"), CPUTier(1 << 20)], LAYOUT, "m")
    with pytest.raises(ValueError, match="neither a compressed format"):
        TieredStore([CPUTier(1 << 20, kv_dtype="fp16")], LAYOUT, "m")
    # another format, another key namespace: entries of one never reach the other
    a = TieredStore([CPUTier(1 << 20, kv_dtype="fp8")], LAYOUT, "m")
    b = TieredStore([CPUTier(1 << 20, kv_dtype="int8")], LAYOUT, "m")
    c = TieredStore([CPUTier(1 << 20)], LAYOUT, "m")
    assert len({a.key_prefix, b.key_prefix, c.key_prefix}) == 3
    for t in (a, b, c):
        t.close()


def test_convert_rows_of_a_tier_is_what_promote_writes():
    """The promoted block is exactly convert_rows(convert_rows(block)): demote and promote
    add nothing to the one conversion each way."""
    pool = random_pool(LAYOUT, seed=3)
    ts = TieredStore([CPUTier(1 << 20, kv_dtype="fp8")], LAYOUT, "m")
    ts.attach(pool)
    rows = pool.read_blocks([2]).clone()
    small = LAYOUT.with_kv_dtype("fp8")
    expect = convert_rows(convert_rows(rows, LAYOUT, small), small, LAYOUT)
    ts.demote([(2, hashes(1)[0])])
    ts.flush()
    assert ts.promote(hashes(1), [9]) == 1
    assert torch.equal(pool.read_blocks([9]), expect)
    ts.close()
