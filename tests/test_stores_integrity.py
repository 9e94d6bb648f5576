"""The stores' and tiers' bookkeeping checks can fail, and the shared pieces do their job.

In the style of test_integrity_mutations.py: a live object in a rich state passes its
``check_integrity()``, then the smallest damage of each kind is planted and the check
must raise :class:`CacheIntegrityError` naming it. Covers PackStore (its in-memory
pack indexes), the tiers' write-back queue, and the one LRU (:class:`ByteLRU`); then
the capabilities the tiers rely on (victims before a put, reads with a header apart).
"""

from __future__ import annotations

import hashlib
import re
import threading

import numpy as np
import pytest
import torch

from pagedkv.errors import CacheIntegrityError
from pagedkv.stores import DiskStore, FramedStore, MemoryStore, PackStore
from pagedkv.stores._lru import ByteLRU
from pagedkv.stores.base import EvictsLRU, ReadsInto, RowStore
from pagedkv.stores.pack_format import PackIndex
from pagedkv.tiers.writeback import Job, WriteBack


def page(i: int, size: int = 64) -> tuple[str, bytes]:
    data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
    return hashlib.sha256(data).hexdigest() + ".pg", data


# -- PackStore ------------------------------------------------------------------------


@pytest.fixture
def packed(tmp_path):
    """Two packs (3 + 2 pages), one page in both (as while a gc rewrites a pack)."""
    s = PackStore(tmp_path)
    s.put_many([page(i) for i in range(3)])
    s.put_many([page(2), page(3), page(4)])
    s.check_integrity()
    yield s
    s.close()


def _cat(s: PackStore):
    return s._catalog


def _packs(s: PackStore) -> list[str]:
    return sorted(_cat(s)._packs)


def _first_entry(s: PackStore) -> tuple[str, str]:
    name = _packs(s)[0]
    return name, sorted(_cat(s)._packs[name].entries)[0]


def _set_entry(s: PackStore, off: int, length: int) -> None:
    name, key = _first_entry(s)
    index = _cat(s)._packs[name]
    index.entries[key] = (off, length)


def _overlap(s: PackStore) -> None:
    name = _packs(s)[0]
    entries = _cat(s)._packs[name].entries
    (k1, (o1, n1)), (k2, _) = sorted(entries.items(), key=lambda kv: kv[1])[:2]
    entries[k2] = (o1 + n1 // 2, n1)  # the second page starts inside the first


def _past_the_data(s: PackStore) -> None:
    name, key = _first_entry(s)
    index = _cat(s)._packs[name]
    off, n = index.entries[key]
    _cat(s)._packs[name] = PackIndex(index.entries, off + n - 1)  # index "starts" inside it


def _listed_in_a_pack_that_lacks_it(s: PackStore) -> None:
    key = page(0)[0]  # only in the first pack
    _cat(s)._where[key].append(_packs(s)[1])


def _unlocated_page(s: PackStore) -> None:
    key = page(1)[0]
    del _cat(s)._where[key]


def _listed_twice(s: PackStore) -> None:
    key = page(0)[0]
    _cat(s)._where[key].append(_cat(s)._where[key][0])


def _wrong_byte_count(s: PackStore) -> None:
    _cat(s)._size[_packs(s)[0]] += 1


def _unreadable_and_indexed(s: PackStore) -> None:
    _cat(s).unreadable.add(_packs(s)[0])


def _not_a_page_key(s: PackStore) -> None:
    name, key = _first_entry(s)
    entries = _cat(s)._packs[name].entries
    entries["snap.m.x"] = entries.pop(key)


PACK_MUTATIONS = [
    pytest.param(_overlap, "overlaps the page before it", id="pack-pages-overlap"),
    pytest.param(lambda s: _set_entry(s, -1, 64), "overlaps the page before it",
                 id="pack-negative-offset"),
    pytest.param(_past_the_data, "runs into the index (at", id="pack-page-into-the-index"),
    pytest.param(_listed_in_a_pack_that_lacks_it, "which does not hold it",
                 id="page-listed-in-wrong-pack"),
    pytest.param(_unlocated_page, "is missing from the page index", id="page-not-located"),
    pytest.param(_listed_twice, "(none, or one twice)", id="page-listed-twice"),
    pytest.param(_wrong_byte_count, "page bytes, its entries hold", id="pack-byte-count"),
    pytest.param(_unreadable_and_indexed, "disagree", id="pack-unreadable-and-indexed"),
    pytest.param(_not_a_page_key, "not a page key", id="pack-holds-a-non-page-key"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), PACK_MUTATIONS)
def test_pack_store_check_fires(packed, mutate, message):
    mutate(packed)
    with pytest.raises(CacheIntegrityError, match=re.escape(message)):
        packed.check_integrity()


def test_pack_store_check_names_the_pack_and_the_page(packed):
    name, key = _first_entry(packed)
    _set_entry(packed, 10**9, 64)
    with pytest.raises(CacheIntegrityError) as info:
        packed.check_integrity()
    assert name in str(info.value) and key in str(info.value)


def test_pack_store_check_holds_through_rewrites_and_other_writers(tmp_path):
    s = PackStore(tmp_path)
    other = PackStore(tmp_path)
    s.put_many([page(i) for i in range(6)])
    other.put_many([page(i) for i in range(4, 9)])
    s.refresh()
    s.check_integrity()
    s.delete_many([page(1)[0], page(5)[0]])  # rewrites both packs holding them
    for store in (s, other):
        store.refresh()
        store.check_integrity()
    assert s.get_many([page(1)[0], page(5)[0]]) == [None, None]
    assert s.get_many([page(0)[0], page(8)[0]]) == [page(0)[1], page(8)[1]]
    s.close()
    other.close()


# -- WriteBack ------------------------------------------------------------------------


@pytest.fixture
def queue():
    """Two jobs queued behind a writer that waits: ``a`` in both (the newer one wins)."""
    gate = threading.Event()
    wb = WriteBack(lambda job: gate.wait(10), 1 << 20)
    wb.submit(Job(["a", "b"], torch.zeros(2, 8, dtype=torch.uint8)))
    wb.submit(Job(["a", "c"], torch.zeros(2, 8, dtype=torch.uint8)))
    wb.check_integrity()
    yield wb
    gate.set()
    wb.close()


def _pending_bytes(wb: WriteBack) -> None:
    wb._pending_bytes += 1


def _row_points_elsewhere(wb: WriteBack) -> None:
    job, _ = wb._pending["c"]
    wb._pending["c"] = type(wb._pending["c"])(job, 0)  # row 0 of that job is "a"


def _key_of_a_finished_job(wb: WriteBack) -> None:
    job = Job(["z"], torch.zeros(1, 8, dtype=torch.uint8))
    wb._pending["z"] = type(wb._pending["a"])(job, 0)


def _key_lost(wb: WriteBack) -> None:
    del wb._pending["b"]


def _key_points_to_an_older_job(wb: WriteBack) -> None:
    first = wb._jobs[0]
    wb._pending["a"] = type(wb._pending["a"])(first, 0)


WRITEBACK_MUTATIONS = [
    pytest.param(_pending_bytes, "pending_bytes(33) != bytes of the 2 queued jobs(32)",
                 id="writeback-pending-bytes"),
    pytest.param(_row_points_elsewhere, "key 'c' is indexed at row 0", id="writeback-wrong-row"),
    pytest.param(_key_of_a_finished_job, "key 'z' is indexed at row 0 of a job that is not queued",
                 id="writeback-job-not-queued"),
    pytest.param(_key_lost, "key 'b' of a queued job is not findable", id="writeback-key-lost"),
    pytest.param(_key_points_to_an_older_job, "key 'a' of a queued job is not findable",
                 id="writeback-older-copy-found"),
    pytest.param(lambda wb: setattr(wb, "lost_blocks", -1), "lost_blocks(-1)",
                 id="writeback-negative-lost"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), WRITEBACK_MUTATIONS)
def test_writeback_check_fires(queue, mutate, message):
    mutate(queue)
    with pytest.raises(CacheIntegrityError, match=re.escape(message)):
        queue.check_integrity()


# -- ByteLRU --------------------------------------------------------------------------


def test_byte_lru_picks_victims_without_changing_anything():
    lru = ByteLRU(100)
    for key, size in (("a", 30), ("b", 30), ("c", 30)):
        lru.add(key, size)
    lru.touch("a")  # order now b, c, a
    assert lru.victims(0) == []
    assert lru.victims(20) == ["b"]  # 90 + 20 > 100: the oldest goes
    assert lru.victims(40, keep={"b"}) == ["c"]
    assert lru.victims(1000) == ["b", "c", "a"]  # not enough even so: everything
    assert lru.oldest(2, keep={"c"}) == ["b", "a"] and lru.oldest(0) == []
    assert list(lru) == ["b", "c", "a"] and lru.bytes_used == 90  # unchanged
    lru.add("b", 50)  # replaced: new size, most recent
    assert list(lru) == ["c", "a", "b"] and lru.bytes_used == 110
    with pytest.raises(CacheIntegrityError, match=re.escape("capacity_bytes(100) disagree")):
        lru.check("X")
    assert lru.pop("b") == 50 and lru.pop("b") is None and lru.bytes_used == 60
    lru.check("X")
    lru.bytes_used += 1
    with pytest.raises(CacheIntegrityError, match=re.escape("X: bytes_used(61), sum of")):
        lru.check("X")


# -- capabilities the tiers rely on -----------------------------------------------------


def test_stores_name_their_victims_before_a_put(tmp_path):
    mem = MemoryStore(3 * 8, slot_bytes=8)
    disk = DiskStore(tmp_path, 3 * 8)
    for store in (mem, disk):
        assert isinstance(store, EvictsLRU)
        store.put_many([(k, bytes(8)) for k in "abc"])
        store.touch(["a"])  # a is now the most recent
        assert store.victims(["d", "e"], 8) == ["b", "c"]
        assert store.victims(["a", "d"], 8) == ["b"]  # a put of "a" replaces, needs no room
        assert store.victims([], 8) == []
        assert sorted(store.keys()) == ["a", "b", "c"]  # nothing was evicted
        store.delete_many(store.victims(["d"], 8))
        store.put_many([("d", bytes(8))])
        assert sorted(store.keys()) == ["a", "c", "d"] and store.stats().evictions == 0
        store.check_integrity()
        store.close()


def test_framed_store_is_a_row_store_over_any_store(tmp_path):
    disk = DiskStore(tmp_path, 1 << 20)
    framed = FramedStore(disk, "fp")
    assert isinstance(framed, RowStore) and isinstance(disk, ReadsInto)
    rows = torch.randint(0, 256, (5, 32), dtype=torch.uint8)
    assert framed.put_tensor_rows([f"k{i}" for i in range(5)], rows) == 5
    out = torch.zeros(6, 32, dtype=torch.uint8)
    assert framed.get_into([f"k{i}" for i in range(5)] + ["none"], out) == [True] * 5 + [False]
    assert torch.equal(out[:5], rows)
    assert framed.victims(["x"], 32) == [] and disk.stats().entries == 5
    with open(disk._files.path("k3"), "r+b") as f:  # flip a payload byte
        f.seek(50)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    assert framed.get_into(["k3"], out[:1]) == [False]
    assert framed.stats().corrupt == 1 and disk.contains_many(["k3"]) == [False]
    framed.check_integrity()
    framed.close()


def test_memory_store_reads_a_header_apart():
    store = MemoryStore(1 << 10, slot_bytes=64)
    store.put_many([("a", bytes(range(40))), ("b", bytes(10))])
    head = torch.zeros(2, 8, dtype=torch.uint8)
    out = torch.zeros(2, 32, dtype=torch.uint8)
    assert store.get_into(["a", "b"], out, head=head) == [True, False]  # b is 10 bytes
    assert bytes(head[0].numpy()) == bytes(range(8)) and bytes(out[0].numpy()) == bytes(
        range(8, 40)
    )
    assert not out[1].any()
    store.check_integrity()
