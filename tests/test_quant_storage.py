"""Quantized blocks move with their scales: read_blocks / write_blocks, copy_blocks,
gather / scatter, pool-to-pool copies, tiers; format conversion; corrupted scales are
caught by the digests that cover a block's bytes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pagedkv import KVCache, ops
from pagedkv._kv_formats import QUANT_FORMATS
from pagedkv.storage import KVLayout, KVPool, convert_blocks, convert_rows
from pagedkv.storage.pool_copy import copy_blocks_between
from pagedkv.storage.rows import payload_view, scale_view
from pagedkv.stores import framing
from pagedkv.tiers import CPUTier

BF16 = torch.bfloat16
FORMATS = ["fp8", "fp8_e5m2", "int8"]
BACKENDS = ["reference"] + (["triton"] if torch.cuda.is_available() else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (unseeded draws included)."""
    torch.manual_seed(0)


def filled(fmt, backend="reference", nb=8, layers=2, seed=0):
    """A quantized pool whose blocks 0..5 hold written tokens (dynamic scales)."""
    torch.manual_seed(seed)
    pool = KVPool(KVLayout(layers, 2, 8, 4, BF16, kv_dtype=fmt), nb, DEV, backend=backend)
    for layer in range(layers):
        k = torch.randn(22, 2, 8, dtype=BF16, device=DEV) * (1 + layer)
        pool.write(layer, torch.arange(22, device=DEV), k, k.flip(0))
    return pool


def state(pool, ids):
    return pool.kv[:, :, ids].clone(), pool.scales[:, :, ids].clone()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_write_blocks_round_trip_bytes_and_scales(fmt, backend):
    src = filled(fmt, backend)
    rows = src.read_blocks([0, 3, 5])
    lay = src.layout
    assert rows.shape == (3, lay.bytes_per_block) and rows.dtype == torch.uint8
    # the row is the payload, then the scales (layer, k/v, head) as float32
    assert torch.equal(payload_view(rows, lay)[1], src.kv[:, :, 3].cpu())
    assert torch.equal(scale_view(rows, lay)[1], src.scales[:, :, 3].cpu())
    dst = KVPool(lay, 8, DEV, backend=backend)
    dst.write_blocks([7, 1, 2], rows)
    assert torch.equal(dst.read_blocks([7, 1, 2]), rows)
    kv, sc = state(dst, [7, 1, 2])
    assert torch.equal(kv.view(torch.uint8), src.kv[:, :, [0, 3, 5]].view(torch.uint8))
    assert torch.equal(sc, src.scales[:, :, [0, 3, 5]])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_blocks_moves_scales_too(fmt, backend):
    pool = filled(fmt, backend)
    want = state(pool, [1, 2])
    pool.copy_blocks([(1, 6), (2, 7)])
    got = state(pool, [6, 7])
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(got[1], want[1])
    pool.copy_blocks([(6, 0), (0, 6)])  # chained: done in list order
    assert torch.equal(pool.scales[:, :, 0], want[1][:, :, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_scatter_of_scales(backend):
    pool = filled("int8", backend)
    ids = torch.tensor([4, 0], device=DEV)
    sc = ops.gather_blocks(pool.scales, ids, backend=backend)  # [n, L, 2, Hkv]
    assert torch.equal(sc, pool.scales[:, :, [4, 0]].movedim(2, 0))
    ops.scatter_blocks(pool.scales, torch.tensor([6, 7], device=DEV), sc, backend=backend)
    assert torch.equal(pool.scales[:, :, [6, 7]], pool.scales[:, :, [4, 0]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_pool_to_pool_copy_is_bit_exact(fmt):
    src = filled(fmt)
    dst = KVPool(src.layout, 8, DEV)
    done = copy_blocks_between(src, [0, 1, 5], dst, [3, 4, 2])
    assert done.bytes == 3 * src.layout.bytes_per_block
    assert torch.equal(dst.read_blocks([3, 4, 2]), src.read_blocks([0, 1, 5]))


def test_tier_swap_round_trips_a_quantized_sequence():
    """The tiers move rows of bytes_per_block: a quantized pool swaps out and in bit-exact
    with its scales, with no change to the tiers."""
    lay = KVLayout(2, 2, 8, 4, BF16, kv_dtype="fp8")
    cache = KVCache(lay, 8, tiers=[CPUTier(1 << 20)])
    cache.allocate("s", list(range(10)))
    slots = torch.tensor(cache.slot_mapping("s"))
    for layer in range(2):
        k = torch.randn(10, 2, 8, dtype=BF16)
        cache.write(layer, slots, k, -k)
    before = cache.read_blocks(cache.block_table("s"))
    cache.swap_out("s")
    assert cache.manager.reset_prefix_cache()  # no prefix hit: every block from the tier
    cache.pool.kv.zero_()
    cache.pool.scales.zero_()
    cache.swap_in("s")
    assert torch.equal(cache.read_blocks(cache.block_table("s")), before)
    cache.check_integrity()
    cache.close()


def test_corrupted_scales_are_caught_by_the_block_digest():
    """Scales are bytes of the block: the digest every tier frame and snapshot page
    carries covers them, so a flipped scale byte is a miss, like a flipped payload byte."""
    pool = filled("fp8")
    lay = pool.layout
    row = pool.read_blocks([2])[0]
    fp = "test-fingerprint"
    blob = bytearray(framing.pack(row.numpy(), fingerprint=fp))
    assert framing.unpack(bytes(blob), fingerprint=fp) is not None
    for where in (lay.payload_bytes // 2, lay.payload_bytes + 5):  # a payload, a scale byte
        bad = bytearray(blob)
        bad[framing.HEADER_BYTES + where] ^= 0x10
        assert framing.unpack(bytes(bad), fingerprint=fp) is None, f"byte {where} not caught"
    # the snapshot page address (sha256 of the row) changes with the scales
    pool.scales[1, 0, 2, 1] *= 1.5
    assert hashlib.sha256(pool.read_blocks([2])[0].numpy()).digest() != hashlib.sha256(
        row.numpy()).digest()  # fmt: skip
    # and what the scale means: a block written back with another scale reads differently
    k, _ = pool.gather(1, [2], 4)
    pool.write_blocks([2], row[None])
    k0, _ = pool.gather(1, [2], 4)
    assert not torch.equal(k, k0) and torch.equal(k[:, 0], k0[:, 0])


# ---- format conversion ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_rows_dequantizes_and_quantizes(fmt):
    q = filled(fmt)
    bf = KVLayout(2, 2, 8, 4, BF16)
    rows = q.read_blocks([0, 1, 2, 3, 4])
    deq = convert_rows(rows, q.layout, bf)
    assert deq.shape == (5, bf.bytes_per_block)
    want = ops.dequantize_blocks(payload_view(rows, q.layout), scale_view(rows, q.layout), BF16)
    assert torch.equal(payload_view(deq, bf), want)
    back = convert_rows(deq, bf, q.layout)  # one rounding: within the format's step
    again = ops.dequantize_blocks(payload_view(back, q.layout), scale_view(back, q.layout),
                                  torch.float32)  # fmt: skip
    err = (again - want.float()).abs()
    step = scale_view(back, q.layout)[:, :, :, None, :, None]
    if fmt == "int8":
        assert (err <= step * 0.5).all()
    else:  # half an ulp, relative; the subnormal step near zero
        f = QUANT_FORMATS[q.layout.kv_dtype]
        tol = want.float().abs() * 2.0**-f.mbits + step * 2.0 ** (f.emin - f.mbits)
        assert (err <= tol).all()
    assert torch.equal(convert_rows(rows, q.layout, q.layout), rows)  # same format: exact


def test_convert_ignores_slots_past_the_fill():
    bf = KVLayout(1, 1, 8, 4, torch.float32)
    rows = torch.zeros(1, bf.bytes_per_block, dtype=torch.uint8)
    vals = payload_view(rows, bf)
    vals[0, 0, :, :2] = torch.randn(2, 2, 1, 8)  # [k/v, tokens, head, dim]
    vals[0, 0, :, 2:] = 1e6  # junk past the fill must not reach the scale
    q = bf.with_kv_dtype("int8")
    out = convert_rows(rows, bf, q, fills=[2])
    assert (payload_view(out, q)[0, 0, :, 2:] == 0).all()
    s = scale_view(out, q)[0, 0, :, 0]
    assert torch.equal(s, vals[0, 0, :, :2].abs().amax(dim=(1, 2, 3)) / 127)  # no headroom
    with pytest.raises(ValueError, match="fills"):
        convert_rows(rows, bf, q, fills=[5])


def test_convert_checks():
    a = KVLayout(1, 1, 8, 4, BF16, kv_dtype="fp8")
    with pytest.raises(ValueError, match="geometry"):
        convert_rows(torch.zeros(1, a.bytes_per_block, dtype=torch.uint8), a,
                     KVLayout(1, 1, 8, 8, BF16))  # fmt: skip
    with pytest.raises(ValueError, match="uint8"):
        convert_rows(torch.zeros(1, 3, dtype=torch.uint8), a, a)
    p, b = KVPool(a, 4), KVPool(a.with_kv_dtype("int8"), 4)
    with pytest.raises(ValueError, match="distinct"):
        convert_blocks(p, [0, 1], b, [2, 2])
    with pytest.raises(ValueError, match="out of range"):
        convert_blocks(p, [9], b, [0])
