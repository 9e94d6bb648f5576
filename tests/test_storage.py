"""KVLayout validation and KVPool operations (reference backend on the CPU)."""

from __future__ import annotations

import pytest
import torch

from pagedkv.storage import KVLayout, KVPool


def make_pool(num_blocks=12, dtype=torch.float32, layers=3, heads=2, dim=8, bs=4) -> KVPool:
    pool = KVPool(KVLayout(layers, heads, dim, bs, dtype), num_blocks)
    pool.kv.copy_(torch.randn(pool.kv.shape).to(dtype))
    return pool


# ---- layout ---------------------------------------------------------------------------------
def test_layout_sizes():
    lay = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
    assert lay.bytes_per_token == 2 * 4 * 8 * 128 * 2
    assert lay.bytes_per_block == lay.bytes_per_token * 16
    assert lay.num_blocks_for(33) == 3
    with pytest.raises(AttributeError):
        lay.block_size = 8  # frozen


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"num_layers": 0}, ValueError),
        ({"head_dim": -1}, ValueError),
        ({"block_size": 2.0}, TypeError),
        ({"num_kv_heads": True}, TypeError),
        ({"dtype": torch.int8}, TypeError),
        ({"dtype": "bfloat16"}, TypeError),
    ],
)
def test_layout_rejects(kwargs, exc):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)
    with pytest.raises(exc):
        KVLayout(**{**args, **kwargs})


def test_pool_shape_and_views():
    pool = KVPool(KVLayout(3, 2, 8, 4, torch.float16), 5)
    assert pool.kv.shape == (3, 2, 5, 4, 2, 8)
    assert pool.k(1).shape == (5, 4, 2, 8)
    assert pool.k(1).data_ptr() == pool.kv[1, 0].data_ptr()
    assert pool.v(2).data_ptr() == pool.kv[2, 1].data_ptr()
    assert pool.nbytes == pool.kv.numel() * 2
    with pytest.raises(IndexError):
        pool.k(3)
    with pytest.raises(ValueError):
        KVPool(pool.layout, 0)
    with pytest.raises(TypeError):
        KVPool((3, 2, 8, 4), 5)


# ---- write / gather ---------------------------------------------------------------------------
def test_write_then_gather_round_trip():
    pool = make_pool()
    table = [7, 2, 9]  # 3 blocks of 4 tokens, random order
    n = 10
    k, v = torch.randn(n, 2, 8), torch.randn(n, 2, 8)
    slots = torch.tensor([table[i // 4] * 4 + i % 4 for i in range(n)], dtype=torch.int32)
    pool.write(1, slots, k, v)
    gk, gv = pool.gather(1, table, n)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    gk, gv = pool.gather(1, torch.tensor(table, dtype=torch.int32), 5)
    assert gk.shape == (5, 2, 8) and torch.equal(gk, k[:5])


def test_write_skips_minus_one():
    pool = make_pool()
    before = pool.kv.clone()
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    pool.write(0, torch.tensor([5, -1, 6]), k, v)
    assert torch.equal(pool.k(0)[1, 1], k[0]) and torch.equal(pool.v(0)[1, 2], v[2])
    pool.kv[0, :, 1, 1:3] = before[0, :, 1, 1:3]
    assert torch.equal(pool.kv, before)


@pytest.mark.parametrize(
    "bad, exc",
    [
        (dict(slots=torch.tensor([0, 48])), ValueError),  # 12 blocks x 4 = 48 slots
        (dict(slots=torch.tensor([0.0, 1.0])), TypeError),
        (dict(slots=torch.tensor([0, 1, 2])), ValueError),
        (dict(k=torch.randn(2, 3, 8)), ValueError),
        (dict(v=torch.randn(2, 2, 8, dtype=torch.float64)), TypeError),
        (dict(k=[[0.0]]), TypeError),
    ],
)
def test_write_rejects_and_changes_nothing(bad, exc):
    pool = make_pool()
    before = pool.kv.clone()
    args = dict(slots=torch.tensor([0, 1]), k=torch.randn(2, 2, 8), v=torch.randn(2, 2, 8))
    args.update(bad)
    with pytest.raises(exc):
        pool.write(0, **args)
    assert torch.equal(pool.kv, before)


def test_gather_rejects():
    pool = make_pool()
    with pytest.raises(ValueError, match="num_tokens"):
        pool.gather(0, [1, 2], 9)
    with pytest.raises(ValueError, match="range"):
        pool.gather(0, [1, 12], 5)


# ---- copy_blocks ------------------------------------------------------------------------------
def test_copy_blocks_all_layers():
    pool = make_pool()
    before = pool.kv.clone()
    pool.copy_blocks([(1, 4), (2, 5), (1, 6)])
    expect = before.clone()
    expect[:, :, [4, 5, 6]] = before[:, :, [1, 2, 1]]
    assert torch.equal(pool.kv, expect)


def test_copy_blocks_chained_keeps_list_order():
    pool = make_pool()
    before = pool.kv.clone()
    pool.copy_blocks([(1, 2), (2, 3), (0, 2)])  # 3 gets the old 1 (copied via 2), then 2 <- 0
    assert torch.equal(pool.kv[:, :, 3], before[:, :, 1])
    assert torch.equal(pool.kv[:, :, 2], before[:, :, 0])


def test_copy_blocks_rejects_and_changes_nothing():
    pool = make_pool()
    before = pool.kv.clone()
    for bad in ([(1, 12)], [(-1, 3)], [(1, 2, 3)]):
        with pytest.raises(ValueError):
            pool.copy_blocks(bad)
    assert torch.equal(pool.kv, before)
    pool.copy_blocks([])
    assert torch.equal(pool.kv, before)


# ---- read_blocks / write_blocks ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_read_blocks_byte_order(dtype):
    pool = make_pool(dtype=dtype)
    data = pool.read_blocks([3, 0])
    lay = pool.layout
    assert data.dtype == torch.uint8 and data.shape == (2, lay.bytes_per_block)
    expect = pool.kv[:, :, 3].contiguous().view(torch.uint8).reshape(-1)  # (layer, kv, tok, h, d)
    assert torch.equal(data[0], expect)


def test_read_write_blocks_exact_inverse():
    src, dst = make_pool(dtype=torch.bfloat16), make_pool(dtype=torch.bfloat16)
    data = src.read_blocks(torch.tensor([5, 1, 7]))
    dst.write_blocks([2, 9, 0], data)
    for a, b in ((5, 2), (1, 9), (7, 0)):
        assert torch.equal(dst.kv[:, :, b], src.kv[:, :, a])
    assert torch.equal(dst.read_blocks([2, 9, 0]), data)


def test_read_blocks_into_out():
    pool = make_pool()
    out = torch.full((2, pool.layout.bytes_per_block), 7, dtype=torch.uint8)
    res = pool.read_blocks([4, 4], out=out, non_blocking=True)
    assert res is out and torch.equal(out[0], out[1])
    with pytest.raises(ValueError):
        pool.read_blocks([4], out=out)


def test_write_blocks_rejects_and_changes_nothing():
    pool = make_pool()
    before = pool.kv.clone()
    good = pool.read_blocks([1, 2])
    with pytest.raises(ValueError, match="distinct"):
        pool.write_blocks([3, 3], good)
    with pytest.raises(ValueError):
        pool.write_blocks([3, 12], good)
    with pytest.raises(ValueError):
        pool.write_blocks([3], good)
    with pytest.raises(TypeError):
        pool.write_blocks([3, 4], good.view(torch.int8))
    assert torch.equal(pool.kv, before)
    empty = pool.read_blocks([])
    assert empty.shape == (0, pool.layout.bytes_per_block)
    pool.write_blocks([], empty)
