"""KVCache.compress / decompress: sequences moved into fp8 / int8 side caches and back,
sharing kept, statistics, errors that change nothing, the audit."""

from __future__ import annotations

import pytest
import torch

from pagedkv import CacheIntegrityError, CachePausedError, CompressionStats, KVCache, OutOfBlocks
from pagedkv.storage import KVLayout

BF16 = torch.bfloat16
LAY = KVLayout(2, 2, 8, 4, BF16)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (unseeded draws included)."""
    torch.manual_seed(0)


def make(num_blocks=16, side=None, **kw):
    return KVCache(LAY, num_blocks, compressed_blocks=side or {"fp8": 16, "int8": 8}, **kw)


def fill(cache, sid, tokens, seed=0):
    """Allocate ``sid`` and write its K/V in every layer; returns the (k, v) per layer."""
    gen = torch.Generator().manual_seed(seed)
    cache.allocate(sid, tokens)
    slots = torch.tensor(cache.slot_mapping(sid))
    kv = []
    for layer in range(LAY.num_layers):
        k = torch.randn(len(tokens), 2, 8, generator=gen).to(BF16)
        v = torch.randn(len(tokens), 2, 8, generator=gen).to(BF16)
        cache.write(layer, slots, k, v)
        kv.append((k, v))
    return kv


def read(cache, sid):
    n = cache.num_tokens(sid)
    return [cache.pool.gather(layer, cache.block_table(sid), n) for layer in range(2)]


def max_err(a, b):
    return max(float((x.float() - y.float()).abs().max()) for p, q in zip(a, b)
               for x, y in zip(p, q))  # fmt: skip


@pytest.mark.parametrize("fmt, bound", [("fp8", 0.13), ("int8", 0.02)])
def test_compress_moves_the_sequence_and_decompress_brings_it_back(fmt, bound):
    cache = make()
    kv = fill(cache, "a", list(range(10)))
    free = cache.num_free_blocks
    cache.compress("a", fmt)
    assert cache.seq_ids() == [] and cache.compressed_ids() == ["a"] and "a" not in cache
    assert cache.num_free_blocks == free + 3  # all released; its 2 full blocks stay cached
    assert cache.stats().cached_blocks == 2 and cache.stats().used_blocks == 0
    side = cache.compressed(fmt)
    assert side.layout.kv_dtype == LAY.with_kv_dtype(fmt).kv_dtype
    assert side.token_ids("a") == list(range(10))
    # relative to |x| <= ~4: fp8 keeps 3 mantissa bits, int8 a step of amax / 127
    assert max_err(read(side, "a"), kv) <= bound * 4
    cache.check_integrity()
    cache.manager.reset_prefix_cache()  # no block of "a" left here: all come back converted
    cache.decompress("a")
    assert cache.seq_ids() == ["a"] and cache.compressed_ids() == [] and side.seq_ids() == []
    assert max_err(read(cache, "a"), kv) <= bound * 4
    cache.check_integrity()


def test_decompress_reuses_blocks_still_cached_here():
    cache = make()
    kv = fill(cache, "a", list(range(10)))
    cache.compress("a")
    cache.decompress("a")  # blocks 0 and 1 were still in the prefix cache: bit-exact
    got = read(cache, "a")
    for (k, v), (gk, gv) in zip(kv, got):
        assert torch.equal(gk[:8], k[:8]) and torch.equal(gv[:8], v[:8])
        assert not torch.equal(gk[8:], k[8:])  # the last block came back from fp8


def test_compressed_sequence_decodes_and_grows_in_its_side_cache():
    cache = make()
    fill(cache, "a", list(range(10)))
    cache.compress("a")
    side = cache.compressed("fp8")
    side.append("a", [10, 11])
    slots = torch.tensor(side.slot_mapping("a", 10, 12))
    side.write(0, slots, torch.randn(2, 2, 8).to(BF16), torch.randn(2, 2, 8).to(BF16))
    bt = side.block_tables_tensor(["a"])
    out = side.decode(torch.randn(1, 4, 8).to(BF16), 0, bt, torch.tensor([12], dtype=torch.int32))
    assert out.shape == (1, 4, 8) and torch.isfinite(out).all()
    cache.decompress("a")
    assert cache.num_tokens("a") == 12 and cache.token_ids("a")[-2:] == [10, 11]
    cache.check_integrity()


def test_shared_blocks_are_encoded_once_and_stay_shared():
    cache = make()
    fill(cache, "a", list(range(12)))
    cache.fork("a", "b")
    cache.append("b", [99])
    cache.compress("a")
    cache.compress("b")  # its three full blocks are found in the side cache
    side = cache.compressed("fp8")
    ta, tb = side.block_table("a"), side.block_table("b")
    assert tb[:3] == ta and len(tb) == 4
    assert side.stats().used_blocks == 4  # 3 + 1 new, not 3 + 4
    st = cache.compression_stats()
    assert isinstance(st, CompressionStats) and st.compressed_seqs == 2
    per_block = LAY.bytes_per_block - side.layout.bytes_per_block
    assert st.bytes_saved == 4 * per_block
    assert st.ratio == pytest.approx(LAY.bytes_per_block / side.layout.bytes_per_block)
    assert 1.5 < st.ratio < 2.0 and st.seconds > 0  # tiny blocks: scales weigh 12.5 %
    cache.free("a")
    cache.free("b")
    assert cache.compression_stats().compressed_seqs == 0 and side.stats().used_blocks == 0
    cache.check_integrity()


def test_errors_change_nothing():
    cache = make(side={"fp8": 4})
    fill(cache, "a", list(range(10)))
    fill(cache, "big", list(range(100, 130)), seed=1)
    snap = cache.read_blocks(cache.block_table("a")), cache.num_free_blocks
    with pytest.raises(ValueError, match="no int8 side cache"):
        cache.compress("a", "int8")
    with pytest.raises(ValueError, match="unknown kv_dtype"):
        cache.compress("a", "fp4")
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.compress("nope")
    with pytest.raises(OutOfBlocks):
        cache.compress("big")  # 8 blocks into a side cache of 4
    with pytest.raises(KeyError, match="not compressed"):
        cache.decompress("a")
    with cache.paused(), pytest.raises(CachePausedError):
        cache.compress("a")
    assert cache.seq_ids() == ["a", "big"] and cache.compressed_ids() == []
    assert torch.equal(cache.read_blocks(cache.block_table("a")), snap[0])
    assert cache.num_free_blocks == snap[1] and cache.compressed("fp8").seq_ids() == []
    cache.check_integrity()
    cache.compress("a")
    with pytest.raises(ValueError, match="compressed"):
        cache.allocate("a", [1, 2])
    with pytest.raises(ValueError, match="compressed"):
        cache.fork("big", "a")
    with pytest.raises(KeyError, match="is compressed"):
        cache.append("a", [5])
    cache.free("big")
    fill(cache, "hog", list(range(200, 264)), seed=2)  # the whole pool
    with pytest.raises(OutOfBlocks):
        cache.decompress("a")  # stays compressed
    assert cache.compressed_ids() == ["a"]
    cache.check_integrity()


@pytest.mark.parametrize(
    "spec, exc, words",
    [
        ({"bf16": 4}, ValueError, "not a compressed format"),
        ({"fp8": 0}, ValueError, ">= 1"),
        ({"fp8": 4, "fp8_e4m3": 4}, ValueError, "twice"),
        (["fp8"], TypeError, "must map"),
    ],
)
def test_bad_side_cache_specs(spec, exc, words):
    with pytest.raises(exc, match=words):
        KVCache(LAY, 4, compressed_blocks=spec)
    q = LAY.with_kv_dtype("fp8")
    with pytest.raises(ValueError, match="already stores"):
        KVCache(q, 4, compressed_blocks={"fp8": 4})


def test_integrity_catches_a_side_cache_out_of_step():
    cache = make()
    fill(cache, "a", list(range(10)))
    cache.compress("a")
    side = cache.compressed("fp8")
    side.free("a")  # behind the cache's back
    with pytest.raises(CacheIntegrityError, match="not live in its side cache"):
        cache.check_integrity()
    side.allocate("stray", [1, 2, 3])
    with pytest.raises(CacheIntegrityError, match="does not list as compressed"):
        cache.check_integrity()
