"""Block stores: MemoryStore, DiskStore, framing and open_store (Redis: test_stores_redis.py)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import subprocess
import sys
import threading
import time
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv.errors import StoreError
from pagedkv.stores import (
    BlockStore,
    DiskStore,
    FramedStore,
    MemoryStore,
    RedisStore,
    StoreStats,
    digest_hex,
    open_store,
    pack,
    unpack,
)
from pagedkv.stores.atomic import host_id
from pagedkv.stores.framing import HEADER_BYTES

SLOT = 128  # MemoryStore slot size in the generic tests; DiskStore values are capped the same


@pytest.fixture(params=["memory", "disk"])
def make_store(request, tmp_path):
    """make_store(n) -> a store that holds exactly n values of SLOT bytes."""

    def make(n: int) -> BlockStore:
        if request.param == "memory":
            return MemoryStore(n * SLOT, slot_bytes=SLOT, pin=False)
        return DiskStore(tmp_path / "store", n * SLOT)

    return make


def rand_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


# -- the BlockStore contract, on every local backend ------------------------------------


def test_protocol_and_roundtrip_bit_exact(make_store):
    store = make_store(64)
    assert isinstance(store, BlockStore)
    rng = random.Random(0)
    sizes = [0, 1, 2, 7, 31, 64, 100, 127, 128]
    items = [(f"k{i}", rand_bytes(rng, n)) for i, n in enumerate(sizes)]
    assert store.put_many(items) == len(items)
    got = store.get_many([k for k, _ in items] + ["absent"])
    assert got[:-1] == [v for _, v in items] and got[-1] is None
    assert all(type(v) is bytes for v in got[:-1])
    # other buffer types, and replacing a value (shorter, then longer)
    store.put_many([("k1", bytearray(b"abc")), ("k2", memoryview(b"\x00\xff" * 10))])
    store.put_many([("k1", b"z" * 128)])
    assert store.get_many(["k1", "k2"]) == [b"z" * 128, b"\x00\xff" * 10]
    assert store.put_many([]) == 0 and store.get_many([]) == []
    store.check_integrity()


def test_lru_eviction_order_exact(make_store):
    store = make_store(4)
    val = {k: bytes([i]) * SLOT for i, k in enumerate("abcdefg")}
    store.put_many([(k, val[k]) for k in "abcd"])
    assert store.get_many(["a"]) == [val["a"]]  # a get is a use: order b c d a
    assert store.contains_many(["b"]) == [True]  # contains is not a use
    store.put_many([("e", val["e"])])  # evicts b
    assert store.contains_many(list("abcde")) == [True, False, True, True, True]
    store.put_many([("c", val["c"])])  # rewriting is a use: order d a e c
    store.put_many([("f", val["f"]), ("g", val["g"])])  # evicts d then a
    assert store.contains_many(list("abcdefg")) == [False, False, True, False, True, True, True]
    assert store.stats().evictions == 3
    assert sorted(store.keys()) == ["c", "e", "f", "g"]
    store.check_integrity()


def test_batch_larger_than_store_keeps_the_newest(make_store):
    store = make_store(3)
    items = [(f"x{i}", bytes([i]) * SLOT) for i in range(5)]
    assert store.put_many(items) == 5
    assert store.contains_many([k for k, _ in items]) == [False, False, True, True, True]
    assert store.get_many(["x4"]) == [bytes([4]) * SLOT]


def test_too_large_value_rejected_before_anything_is_stored(make_store):
    store = make_store(2)
    big = b"x" * (2 * SLOT + 1)
    with pytest.raises(ValueError, match="big"):
        store.put_many([("ok", b"1"), ("big", big)])
    assert store.contains_many(["ok", "big"]) == [False, False]


def test_stats_counters(make_store):
    store = make_store(2)
    assert isinstance(store.stats(), StoreStats)
    store.put_many([("a", b"1" * SLOT), ("b", b"2" * SLOT)])
    store.get_many(["a", "nope", "b", "a"])
    store.put_many([("c", b"3" * 5)])  # memory: a slot is a slot; disk: 5 bytes fit
    store.put_many([("c", b"3" * SLOT)])  # evicts b (a was used last) on both
    s = store.stats()
    assert (s.entries, s.bytes_used, s.capacity_bytes) == (2, 2 * SLOT, 2 * SLOT)
    assert (s.hits, s.misses, s.puts, s.evictions, s.errors, s.corrupt) == (3, 1, 4, 1, 0, 0)
    assert store.delete_many(["a", "a", "zzz"]) == 1
    assert store.stats().entries == 1 and store.stats().bytes_used == SLOT


def test_keys_prefix_and_delete(make_store):
    store = make_store(16)
    names = ["ab1", "ab2", "abc", "b", ".x", "..", "_y", "a"]
    store.put_many([(k, k.encode()) for k in names])
    assert sorted(store.keys()) == sorted(names)
    assert sorted(store.keys("ab")) == ["ab1", "ab2", "abc"]
    assert sorted(store.keys("a")) == ["a", "ab1", "ab2", "abc"]
    assert sorted(store.keys(".")) == ["..", ".x"]
    assert list(store.keys("zz")) == []
    assert store.get_many([".."]) == [b".."]
    assert store.delete_many(["ab1", "ab2", ".."]) == 3
    assert sorted(store.keys("ab")) == ["abc"]
    with pytest.raises(ValueError):
        list(store.keys("a/b"))


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 201, "ü", "a b", "../etc", "k\n", 5, b"ab", None])
def test_invalid_keys_rejected(make_store, bad):
    store = make_store(2)
    for op in (
        lambda: store.put_many([(bad, b"v")]),
        lambda: store.get_many([bad]),
        lambda: store.contains_many(["ok", bad]),
        lambda: store.delete_many([bad]),
    ):
        with pytest.raises(ValueError, match="invalid block-store key") as info:
            op()
        assert repr(bad) in str(info.value)
    assert store.stats().entries == 0


def test_max_length_key_ok(make_store):
    store = make_store(2)
    key = "K" * 200
    store.put_many([(key, b"v")])
    assert store.get_many([key]) == [b"v"] and list(store.keys()) == [key]


def test_bad_values_rejected(make_store):
    store = make_store(2)
    with pytest.raises(TypeError, match="bytes"):
        store.put_many([("a", "text")])
    with pytest.raises(TypeError, match="pairs"):
        store.put_many(["a"])


def test_closed_store_and_context_manager(make_store):
    with make_store(2) as store:
        store.put_many([("a", b"1")])
    with pytest.raises(ValueError, match="closed"):
        store.get_many(["a"])


def test_threads_hammering_one_store(make_store):
    store = make_store(32)
    errors = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                k = f"t{rng.randrange(64)}"
                v = hashlib.sha256(k.encode()).digest() * 4
                if rng.random() < 0.5:
                    store.put_many([(k, v)])
                else:
                    got = store.get_many([k])[0]
                    assert got is None or got == v
        except Exception as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store.check_integrity()
    assert store.stats().entries <= 32


class LRUModel(RuleBasedStateMachine):
    """Random operations on a store and on an OrderedDict model; contents and order agree."""

    def __init__(self) -> None:
        super().__init__()
        self.model: OrderedDict[str, bytes] = OrderedDict()
        self.store = self.make()

    def make(self) -> BlockStore:
        raise NotImplementedError

    def over(self) -> bool:
        raise NotImplementedError

    @rule(k=st.sampled_from("abcdefgh"), n=st.integers(0, 64), b=st.integers(0, 255))
    def put(self, k, n, b):
        v = bytes([b]) * n
        self.store.put_many([(k, v)])
        self.model.pop(k, None)
        self.model[k] = v
        while self.over():
            self.model.popitem(last=False)

    @rule(k=st.sampled_from("abcdefgh"))
    def get(self, k):
        expected = self.model.get(k)
        if expected is not None:
            self.model.move_to_end(k)
        assert self.store.get_many([k]) == [expected]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        k = data.draw(st.sampled_from(sorted(self.model)))
        assert self.store.delete_many([k]) == 1
        del self.model[k]

    @invariant()
    def agree(self):
        self.store.check_integrity()
        assert sorted(self.store.keys()) == sorted(self.model)

    def teardown(self):
        self.store.close()


class MemoryLRU(LRUModel):
    def make(self):
        return MemoryStore(4 * 64, slot_bytes=64, pin=False)

    def over(self):
        return len(self.model) > 4


class DiskLRU(LRUModel):
    def make(self):
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        return DiskStore(self.tmp.name, 150)

    def over(self):
        return sum(map(len, self.model.values())) > 150

    def teardown(self):
        super().teardown()
        self.tmp.cleanup()


TestMemoryLRU = MemoryLRU.TestCase
TestMemoryLRU.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestDiskLRU = DiskLRU.TestCase
TestDiskLRU.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)


# -- construction errors ----------------------------------------------------------------


@pytest.mark.parametrize("cap", [0, -1, 1.5, True, None, "1G"])
def test_bad_capacity(cap, tmp_path):
    with pytest.raises(ValueError, match="capacity_bytes"):
        MemoryStore(cap)
    with pytest.raises(ValueError, match="capacity_bytes"):
        DiskStore(tmp_path, cap)


def test_memory_bad_slot_config():
    with pytest.raises(ValueError, match="slot_bytes"):
        MemoryStore(100, slot_bytes=0)
    with pytest.raises(ValueError, match="slot_bytes"):
        MemoryStore(100, slot_bytes=101)


def test_disk_unwritable_path(tmp_path):
    afile = tmp_path / "regular-file"
    afile.write_bytes(b"")
    target = afile / "store"
    with pytest.raises(StoreError, match="regular-file") as info:
        DiskStore(target, 1024)
    assert "writable" in str(info.value)
    with pytest.raises(StoreError):
        DiskStore(afile, 1024)  # the path itself is a file


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_disk_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="ro"):
            DiskStore(ro, 1024)
    finally:
        ro.chmod(0o700)


# -- MemoryStore specifics --------------------------------------------------------------


def test_memory_slab_allocated_once_and_slot_from_first_put():
    store = MemoryStore(1000, pin=False)
    assert store.slot_bytes is None and store.num_slots == 0
    store.put_many([("a", b"x" * 100), ("b", b"y" * 50)])
    assert (store.slot_bytes, store.num_slots, store.pinned) == (100, 10, False)
    with pytest.raises(ValueError, match="larger than a slot"):
        store.put_many([("c", b"z" * 101)])
    with pytest.raises(ValueError, match="slot_bytes="):
        MemoryStore(1000).put_many([("a", b"")])
    assert MemoryStore(64, slot_bytes=64).pinned == torch.cuda.is_available()


def test_memory_tensor_fast_path():
    store = MemoryStore(8 * 256, slot_bytes=256, pin=False)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (5, 256), dtype=torch.uint8, generator=gen)
    keys = [f"blk{i}" for i in range(5)]
    assert store.put_tensor_rows(keys, rows) == 5
    assert store.get_many(keys[:2]) == [rows[0].numpy().tobytes(), rows[1].numpy().tobytes()]

    out = torch.zeros(5, 256, dtype=torch.uint8)
    assert store.get_into(keys, out) == [True] * 5
    assert torch.equal(out, rows)

    # misses (and a value of another length) leave their rows untouched
    store.put_many([("short", b"s" * 10)])
    out = torch.full((4, 256), 7, dtype=torch.uint8)
    assert store.get_into(["blk3", "nope", "short", "blk0"], out) == [True, False, False, True]
    assert torch.equal(out[0], rows[3]) and torch.equal(out[3], rows[0])
    assert (out[1] == 7).all() and (out[2] == 7).all()

    # non-contiguous destination, narrower rows, duplicates (last wins)
    wide = torch.zeros(5, 512, dtype=torch.uint8)
    assert store.get_into(keys, wide[:, :256]) == [True] * 5
    assert torch.equal(wide[:, :256], rows)
    narrow = rows[:2, :100].contiguous()
    store.put_tensor_rows(["n", "n"], narrow)
    out = torch.zeros(1, 100, dtype=torch.uint8)
    assert store.get_into(["n"], out) == [True] and torch.equal(out[0], narrow[1])
    assert store.get_many(["n"]) == [narrow[1].numpy().tobytes()]

    # LRU covers the fast path: 8 slots, 7 used, order short blk0..blk4 n; touch blk0
    store.get_into(["blk0"], torch.zeros(1, 256, dtype=torch.uint8))
    store.put_tensor_rows(["p", "q"], rows[:2])  # p takes the free slot, q evicts short
    assert store.contains_many(["short", "blk1"]) == [False, True]
    store.put_tensor_rows(["r"], rows[:1])  # evicts blk1, not the touched blk0
    assert store.contains_many(["blk1", "blk2", "blk0"]) == [False, True, True]
    store.check_integrity()

    with pytest.raises(ValueError, match="uint8"):
        store.put_tensor_rows(["a"], torch.zeros(1, 256))
    with pytest.raises(ValueError, match="rows"):
        store.get_into(["a", "b"], torch.zeros(1, 256, dtype=torch.uint8))
    with pytest.raises(ValueError, match="larger than"):
        store.put_tensor_rows(["a"], torch.zeros(1, 300, dtype=torch.uint8))


# -- DiskStore specifics ----------------------------------------------------------------


def test_disk_survives_restart_with_lru_order(tmp_path):
    with DiskStore(tmp_path, 400) as a:
        a.put_many([(k, k.encode() * 100) for k in "abcd"])
        a.get_many(["a"])
    b = DiskStore(tmp_path, 400)
    assert b.stats().entries == 4 and b.stats().bytes_used == 400
    assert b.get_many(list("abcd")) == [k.encode() * 100 for k in "abcd"]  # order: a b c d
    b.get_many(["b", "a"])  # order: c d b a
    b.close()
    c = DiskStore(tmp_path, 400)
    c.put_many([("e", b"e" * 200)])  # evicts c, d
    assert c.contains_many(list("abcde")) == [True, True, False, False, True]
    c.check_integrity()
    # reopening with a smaller cap evicts down to it, oldest first
    d = DiskStore(tmp_path, 300)
    assert sorted(d.keys()) == ["a", "e"] and d.stats().bytes_used == 300


def test_disk_layout_and_temp_cleanup(tmp_path):
    store = DiskStore(tmp_path, 10_000)
    store.put_many([("abc", b"1"), ("..", b"2"), (".", b"3")])
    # <first two chars><last char>/<key>.v, dots as "_"
    assert (tmp_path / "abc" / "abc.v").read_bytes() == b"1"
    assert (tmp_path / "___" / "...v").read_bytes() == b"2"
    assert (tmp_path / "__" / "..v").read_bytes() == b"3"
    # a dead writer's temp files, a live writer's temp file and foreign files
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    host = host_id()
    dead_tmp = tmp_path / "abc" / f".pagedkv-tmp-{host}-{dead_pid}-00112233aabb"
    dead_root_tmp = tmp_path / f".pagedkv-tmp-{host}-{dead_pid}-00112233aabc"
    live_tmp = tmp_path / "abc" / f".pagedkv-tmp-{host}-{os.getpid()}-00112233aabb"
    # kept: names pagedkv never makes (an old-style one, any *.tmp) and a fresh temp of
    # another host (its writer cannot be checked)
    foreign = [
        tmp_path / "abc" / f"abc.{dead_pid}.0011.tmp",
        tmp_path / "abc" / f".pagedkv-tmp-{'f' * 8 if host != 'f' * 8 else '0' * 8}-"
        f"{dead_pid}-00112233aabb",
        tmp_path / "abc" / "notes.tmp",
        tmp_path / "notes.tmp",
    ]
    # another host's temp (or a reused pid's) untouched for over 10 minutes is garbage
    old_tmp = tmp_path / "abc" / f".pagedkv-tmp-{'f' * 8}-{os.getpid()}-00112233aabd"
    for p in (dead_tmp, dead_root_tmp, live_tmp, old_tmp, *foreign):
        p.write_bytes(b"partial")
    os.utime(old_tmp, (time.time() - 601, time.time() - 601))
    (tmp_path / "abc" / "notes.txt").write_bytes(b"?")
    (tmp_path / "README").write_bytes(b"?")
    again = DiskStore(tmp_path, 10_000)
    assert not dead_tmp.exists() and not dead_root_tmp.exists() and live_tmp.exists()
    assert not old_tmp.exists()
    assert all(p.exists() for p in foreign)
    assert sorted(again.keys()) == [".", "..", "abc"]
    assert again.stats().entries == 3


def test_disk_shared_between_instances(tmp_path):
    a = DiskStore(tmp_path, 10_000)
    b = DiskStore(tmp_path, 10_000, fsync=True)
    b.put_many([("k", b"from-b")])
    assert a.contains_many(["k"]) == [True]
    assert a.get_many(["k"]) == [b"from-b"]
    assert a.stats().entries == 1  # learned on read
    a.put_many([("k", b"from-a")])
    assert b.get_many(["k"]) == [b"from-a"]
    assert b.delete_many(["k"]) == 1
    assert a.get_many(["k"]) == [None] and a.stats().entries == 0


def test_disk_large_values(tmp_path):
    store = DiskStore(tmp_path, 64 << 20)
    big = os.urandom(8 << 20)
    store.put_many([("big", big), ("empty", b"")])
    assert store.get_many(["big", "empty"]) == [big, b""]


def test_disk_parallel_writers_keep_order_and_accounting(tmp_path):
    v = 128 << 10  # large enough for the writer threads
    store = DiskStore(tmp_path, 6 * v, writers=4)
    vals = {f"k{i:02d}": os.urandom(v) for i in range(10)}
    assert store.put_many(list(vals.items())) == 10
    # committed in batch order: the first four were evicted, LRU first
    assert sorted(store.keys()) == [f"k{i:02d}" for i in range(4, 10)]
    assert store.get_many([f"k{i:02d}" for i in range(4, 10)]) == list(vals.values())[4:]
    st_ = store.stats()
    assert (st_.entries, st_.bytes_used, st_.puts, st_.evictions) == (6, 6 * v, 10, 4)
    store.check_integrity()
    store.close()
    assert not [p for p in tmp_path.rglob(".pagedkv-tmp-*")]
    again = DiskStore(tmp_path, 6 * v)
    again.put_many([("new", os.urandom(v))])  # restart keeps the order: k04 goes first
    assert sorted(again.keys()) == sorted(["new"] + [f"k{i:02d}" for i in range(5, 10)])


def test_disk_parallel_writers_error_leaves_no_temp(tmp_path, monkeypatch):
    v = 128 << 10
    store = DiskStore(tmp_path, 64 << 20, writers=3)
    real = DiskStore._write_temp

    def flaky(self, key, value):
        if key == "k05":
            raise StoreError("boom")
        return real(self, key, value)

    monkeypatch.setattr(DiskStore, "_write_temp", flaky)
    with pytest.raises(StoreError, match="boom"):
        store.put_many([(f"k{i:02d}", os.urandom(v)) for i in range(12)])
    assert not [p for p in tmp_path.rglob(".pagedkv-tmp-*")]
    assert set(store.keys()) <= {f"k{i:02d}" for i in range(5)}
    store.check_integrity()
    with pytest.raises(ValueError, match="writers"):
        DiskStore(tmp_path, 1024, writers=0)


# -- framing ----------------------------------------------------------------------------

FP = "model=smollm2;layout=30x2x64;dtype=bf16"


def test_pack_unpack_roundtrip():
    for payload in [b"", b"x", os.urandom(1000)]:
        blob = pack(payload, fingerprint=FP)
        assert len(blob) == HEADER_BYTES + len(payload) and blob[:4] == b"PKV1"
        assert bytes(unpack(blob, fingerprint=FP)) == payload
        assert bytes(unpack(bytearray(blob), fingerprint=FP)) == payload
    assert digest_hex(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert bytes(unpack(pack(memoryview(b"ab"), fingerprint=FP), fingerprint=FP)) == b"ab"


def test_unpack_rejects_every_single_byte_change():
    payload = os.urandom(64)
    blob = pack(payload, fingerprint=FP)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        assert unpack(bytes(bad), fingerprint=FP) is None, f"flip at byte {i} accepted"
    for n in range(len(blob)):
        assert unpack(blob[:n], fingerprint=FP) is None, f"truncation to {n} accepted"
    assert unpack(blob + b"\x00", fingerprint=FP) is None
    assert unpack(blob, fingerprint=FP + "x") is None
    assert unpack(b"", fingerprint=FP) is None and unpack(None, fingerprint=FP) is None


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=300),
    where=st.integers(min_value=0),
    mask=st.integers(1, 255),
)
def test_unpack_rejects_any_flip(payload, where, mask):
    blob = bytearray(pack(payload, fingerprint=FP))
    blob[where % len(blob)] ^= mask
    assert unpack(bytes(blob), fingerprint=FP) is None


def test_framed_store_deletes_corrupt_values(make_store):
    inner = make_store(16)
    store = FramedStore(inner, FP)
    store.put_many([("a", b"A" * 50), ("b", b"B" * 50), ("c", b"C" * 10)])
    assert inner.get_many(["a"])[0][:4] == b"PKV1"
    raw = bytearray(inner.get_many(["a"])[0])
    raw[HEADER_BYTES + 3] ^= 0x80
    inner.put_many([("a", raw), ("b", inner.get_many(["b"])[0][:-1])])
    FramedStore(inner, "other-model").put_many([("c", b"C" * 10)])
    assert store.get_many(["a", "b", "c", "zz"]) == [None, None, None, None]
    assert inner.contains_many(["a", "b", "c"]) == [False, False, False]
    s = store.stats()
    assert s.corrupt == 3 and s.misses == 4
    store.put_many([("a", b"fresh")])
    assert store.get_many(["a"]) == [b"fresh"] and store.contains_many(["a"]) == [True]
    assert list(store.keys()) == ["a"] and store.capacity_bytes == inner.capacity_bytes


# -- open_store -------------------------------------------------------------------------


def test_open_store(tmp_path):
    assert isinstance(open_store("memory://", capacity_bytes=1024, slot_bytes=64), MemoryStore)
    d = open_store(str(tmp_path / "a"), capacity_bytes=1024)
    assert isinstance(d, DiskStore) and d.path == str(tmp_path / "a")
    assert isinstance(open_store(pathlib.Path(tmp_path / "b"), capacity_bytes=10), DiskStore)
    f = open_store(f"file://{tmp_path}/c", capacity_bytes=10)
    assert isinstance(f, DiskStore) and f.path == str(tmp_path / "c")
    # Redis construction never connects: a down server still gives a store
    r = open_store("redis://127.0.0.1:1/0", socket_timeout=0.2, connect_timeout=0.2)
    assert isinstance(r, RedisStore) and r.capacity_bytes is None and r.ping() is False
    assert isinstance(open_store("rediss://example.invalid:6380/2"), RedisStore)
    with pytest.raises(ValueError, match="unknown scheme"):
        open_store("s3://bucket/x")
    with pytest.raises(ValueError, match="file:///path"):
        open_store("file://otherhost/x", capacity_bytes=10)
    with pytest.raises(ValueError):
        open_store("")


@pytest.mark.gpu
def test_memory_tensor_fast_path_cuda():
    store = MemoryStore(64 * 4096, slot_bytes=4096)
    assert store.pinned
    rows = torch.randint(0, 256, (40, 4096), dtype=torch.uint8, device="cuda")
    keys = [f"g{i}" for i in range(40)]
    store.put_tensor_rows(keys[:20], rows[:20])
    store.delete_many(["g3", "g7"])  # free slots out of order: puts split into runs
    store.put_tensor_rows(keys[20:] + ["g3", "g7"], torch.cat([rows[20:], rows[3:4], rows[7:8]]))
    assert store.get_many(["g25"]) == [rows[25].cpu().numpy().tobytes()]
    out = torch.zeros(41, 4096, dtype=torch.uint8, device="cuda")
    found = store.get_into(keys[::-1] + ["nope"], out, non_blocking=True)
    store.put_many([("late", b"x" * 4096)])  # waits for the async reads before writing
    torch.cuda.synchronize()
    assert found == [True] * 40 + [False]
    assert torch.equal(out[:40], rows.flip(0)) and not out[40].any()
    store.check_integrity()
