"""The fast host paths of offload and snapshots: KVPool's direct CPU gather/scatter, the
recycled host rows of Transfer, DiskStore.get_into and framing format 2 (XXH3-128)."""

from __future__ import annotations

import gc
import hashlib
import struct

import numpy as np
import pytest
import torch

from pagedkv.ops import reference
from pagedkv.storage import KVLayout, KVPool
from pagedkv.storage.host import HostRowCache
from pagedkv.stores import DiskStore, pack, unpack
from pagedkv.stores.framing import FORMAT_VERSION, HEADER_BYTES, pack_into, verify

FP = "model=x;layout=2x2x8;dtype=bf16"


# -- KVPool on the CPU: one pass between pool and rows, same bytes as the reference ---------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers, heads, dim, bs", [(1, 1, 4, 1), (3, 2, 8, 4), (2, 4, 16, 16)])
def test_cpu_read_write_blocks_match_reference(dtype, layers, heads, dim, bs):
    lay = KVLayout(layers, heads, dim, bs, dtype)
    g = torch.Generator().manual_seed(layers * 100 + bs)
    src = KVPool(lay, 13)
    src.kv.view(torch.uint8).copy_(
        torch.randint(0, 256, src.kv.view(torch.uint8).shape, generator=g)
    )
    ids = torch.randperm(13, generator=g)[:7]
    rows = src.read_blocks(ids)
    expect = reference.gather_blocks(src.kv, ids).reshape(7, -1).view(torch.uint8)
    assert torch.equal(rows, expect)
    out = torch.empty_like(rows)
    assert src.read_blocks(ids.tolist(), out=out) is out and torch.equal(out, expect)

    dst_ids = torch.randperm(13, generator=g)[:7]
    got, want = KVPool(lay, 13), torch.zeros_like(src.kv)
    got.write_blocks(dst_ids, rows)
    reference.scatter_blocks(want, dst_ids, reference.gather_blocks(src.kv, ids))
    assert torch.equal(got.kv.view(torch.uint8), want.view(torch.uint8))  # bitwise (NaN bytes)


def test_cpu_write_blocks_accepts_non_contiguous_rows():
    lay = KVLayout(2, 2, 8, 4, torch.float16)
    src, dst = KVPool(lay, 6), KVPool(lay, 6)
    src.kv.normal_()
    wide = torch.zeros((3, 2 * lay.bytes_per_block), dtype=torch.uint8)
    rows = wide[:, : lay.bytes_per_block]
    rows.copy_(src.read_blocks([4, 0, 2]))
    dst.write_blocks([1, 2, 3], rows)
    assert torch.equal(dst.read_blocks([1, 2, 3]), src.read_blocks([4, 0, 2]))


# -- recycled host rows -------------------------------------------------------------------


def test_host_row_cache_reuses_released_rows():
    cache = HostRowCache(64 << 20)
    a = cache.take(4, 1 << 20)
    ptr = a.data_ptr()
    half = a[2:]  # a view keeps the buffer lent
    del a
    gc.collect()
    assert cache.idle_bytes == 0
    del half
    gc.collect()
    assert cache.idle_bytes == 4 << 20
    b = cache.take(4, 1 << 20)  # same size: the same warm buffer
    assert b.data_ptr() == ptr and b.shape == (4, 1 << 20) and cache.idle_bytes == 0
    c = cache.take(1, 1 << 20)  # another size: a new buffer
    assert c.data_ptr() != ptr
    small = cache.take(2, 100)  # below the recycling size: plain
    assert small.shape == (2, 100)
    del b, c, small
    gc.collect()
    assert cache.idle_bytes == 5 << 20
    # the cap frees the oldest idle buffers first
    capped = HostRowCache(3 << 20)
    x, y = capped.take(2, 1 << 20), capped.take(2, 1 << 20)
    del x, y
    gc.collect()
    assert capped.idle_bytes == 2 << 20


# -- DiskStore.get_into ---------------------------------------------------------------------


def test_disk_get_into(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    store.put_many([("a", b"A" * 8), ("b", b"B" * 8), ("short", b"s" * 7)])
    out = torch.full((4, 8), 7, dtype=torch.uint8)
    found = store.get_into(["b", "missing", "short", "a"], out)
    assert found == [True, False, False, True]
    assert bytes(out[0].numpy()) == b"B" * 8 and bytes(out[3].numpy()) == b"A" * 8
    assert out[1].eq(7).all() and out[2].eq(7).all()  # not found: untouched
    # header apart from payload: values of exactly h + w bytes
    head = np.zeros((2, 3), dtype=np.uint8)
    body = np.zeros((2, 5), dtype=np.uint8)
    assert store.get_into(["a", "short"], body, head=head) == [True, False]
    assert bytes(head[0]) == b"AAA" and bytes(body[0]) == b"AAAAA" and not body[1].any()
    with pytest.raises(ValueError, match="uint8"):
        store.get_into(["a"], torch.zeros((1, 8), dtype=torch.int16))
    with pytest.raises(ValueError, match=r"\[2, w\]"):
        store.get_into(["a", "b"], np.zeros((1, 8), dtype=np.uint8))
    # the LRU sees get_into as a use: "b" was read last, so "short" goes first
    store2 = DiskStore(tmp_path, 16)
    assert sorted(store2.keys()) == ["a", "b"]
    store.check_integrity()


# -- framing format 2 ---------------------------------------------------------------------


def test_framing_v2_xxh3_and_old_versions_are_misses():
    payload = bytes(range(256)) * 10
    blob = pack(payload, fingerprint=FP)
    assert struct.unpack_from("<H", blob, 4)[0] == FORMAT_VERSION == 2
    # a version-1 header (blake2b digest) over the same payload is a miss, never an error
    v1 = bytearray(blob)
    struct.pack_into("<H", v1, 4, 1)
    v1[HEADER_BYTES - 16 : HEADER_BYTES] = hashlib.blake2b(payload, digest_size=16).digest()
    assert unpack(bytes(v1), fingerprint=FP) is None
    for version in (0, 3, 0xFFFF):
        other = bytearray(blob)
        struct.pack_into("<H", other, 4, version)
        assert unpack(bytes(other), fingerprint=FP) is None
    # pack_into: the same bytes as pack, into a caller's buffer; verify: unpack in parts
    buf = bytearray(HEADER_BYTES + len(payload))
    pack_into(buf, np.frombuffer(payload, dtype=np.uint8), fingerprint=FP)
    assert bytes(buf) == blob
    assert verify(buf[:HEADER_BYTES], buf[HEADER_BYTES:], fingerprint=FP)
    assert not verify(buf[:HEADER_BYTES], buf[HEADER_BYTES:-1], fingerprint=FP)
    assert not verify(buf[:HEADER_BYTES], buf[HEADER_BYTES:], fingerprint=FP + "x")
    assert not verify(buf[: HEADER_BYTES - 1], buf[HEADER_BYTES:], fingerprint=FP)
    buf[-1] ^= 1
    assert not verify(buf[:HEADER_BYTES], buf[HEADER_BYTES:], fingerprint=FP)
    with pytest.raises(ValueError, match="HEADER_BYTES"):
        pack_into(bytearray(10), payload, fingerprint=FP)
