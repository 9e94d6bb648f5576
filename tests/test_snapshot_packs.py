"""PackStore: snapshot pages in pack files, everything else in a DiskStore."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from pagedkv.snapshot import SnapshotStore
from pagedkv.storage.layout import KVLayout
from pagedkv.stores import DiskStore, PackStore
from pagedkv.stores.atomic import host_id
from pagedkv.stores.pack_format import PACK_DIR
from pagedkv.testing import SyntheticPager


def page(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
    return hashlib.sha256(data).hexdigest() + ".pg", data


def packs(path) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(path, PACK_DIR)) if n.endswith(".pack"))


def test_round_trip_pages_in_one_pack_other_keys_as_files(tmp_path):
    s = PackStore(tmp_path)
    items = [page(i) for i in range(5)]
    assert s.put_many([*items, ("snap.m.x", b"{}")]) == 6
    assert len(packs(tmp_path)) == 1  # one put_many of pages = one pack
    assert s.get_many([k for k, _ in items]) == [v for _, v in items]
    assert s.get_many(["snap.m.x", "f" * 64 + ".pg"]) == [b"{}", None]
    assert s.contains_many([items[0][0], "snap.m.x", "snap.m.y"]) == [True, True, False]
    assert sorted(s.keys("")) == sorted([k for k, _ in items] + ["snap.m.x"])
    assert list(s.keys("snap.")) == ["snap.m.x"]
    out = torch.zeros(3, 1000, dtype=torch.uint8)
    found = s.get_into([items[2][0], "0" * 64 + ".pg", items[4][0]], out)
    assert found == [True, False, True]
    assert out[0].numpy().tobytes() == items[2][1] and out[1].sum() == 0
    st = s.stats()
    assert st.entries == 6 and st.bytes_used == 5 * 1000 + 2
    s.close()


def test_another_handle_sees_new_packs_and_deletions(tmp_path):
    a, b = PackStore(tmp_path), PackStore(tmp_path)
    items = [page(i) for i in range(4)]
    a.put_many(items)
    assert b.get_many([items[1][0]]) == [items[1][1]]  # b rescans when a key is unknown
    assert a.delete_many([items[1][0], items[3][0], "nope.pg"]) == 2
    assert len(packs(tmp_path)) == 1  # rewritten without the two pages
    assert b.contains_many([k for k, _ in items]) == [True, False, True, False]
    assert b.get_many([items[0][0], items[1][0]]) == [items[0][1], None]
    assert b.delete_many([items[0][0], items[2][0]]) == 2
    assert packs(tmp_path) == [] and list(a.keys("")) == []
    a.close()
    b.close()


def test_replacing_a_page_reads_the_newest_copy_and_delete_removes_all(tmp_path):
    s = PackStore(tmp_path)
    key, value = page(0)
    s.put_many([(key, value)])
    s.put_many([(key, b"garbage")])
    assert s.get_many([key]) == [b"garbage"]
    out = torch.zeros(1, len(value), dtype=torch.uint8)
    assert s.get_into([key], out) == [False]  # the newest copy has another size
    s.put_many([(key, value)])
    assert s.get_many([key]) == [value]
    assert s.delete_many([key]) == 1 and packs(tmp_path) == []
    s.close()


def test_large_put_is_split_over_parallel_packs(tmp_path):
    s = PackStore(tmp_path, writers=4)
    items = [page(i, 4 << 20) for i in range(12)]  # 48 MiB -> 3 packs of >= 16 MiB
    s.put_many(items)
    assert len(packs(tmp_path)) == 3
    assert PackStore(tmp_path).get_many([k for k, _ in items]) == [v for _, v in items]
    s.close()


def test_pages_of_a_store_from_before_packs_are_still_read(tmp_path):
    old = DiskStore(tmp_path, capacity_bytes=1 << 40)
    legacy = [page(i) for i in range(3)]
    old.put_many(legacy)
    old.close()
    s = PackStore(tmp_path)
    assert s.get_many([k for k, _ in legacy]) == [v for _, v in legacy]
    out = torch.zeros(1, 1000, dtype=torch.uint8)
    assert s.get_into([legacy[0][0]], out) == [True]
    assert s.contains_many([legacy[2][0]]) == [True]
    assert sorted(s.keys("")) == sorted(k for k, _ in legacy)
    assert s.delete_many([legacy[0][0]]) == 1 and s.contains_many([legacy[0][0]]) == [False]
    s.close()


def test_damaged_or_partial_packs_never_surface(tmp_path):
    s = PackStore(tmp_path)
    items = [page(i) for i in range(3)]
    s.put_many(items)
    s.close()
    (name,) = packs(tmp_path)
    path = os.path.join(tmp_path, PACK_DIR, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)  # the footer no longer verifies
    # a dead writer's temp pack (pid 999999999 does not exist) is removed by the first
    # write (opening, and reading, change nothing); a name pagedkv never gives a temp
    # file is never removed
    tmp = os.path.join(tmp_path, PACK_DIR, f".pagedkv-tmp-{host_id()}-999999999-00aa11bb22cc")
    other = os.path.join(tmp_path, PACK_DIR, "0-1-2.pack.999999999.abcd.tmp")
    for p in (tmp, other):
        with open(p, "wb") as f:
            f.write(b"partial")
    s = PackStore(tmp_path)
    assert s.get_many([k for k, _ in items]) == [None] * 3
    assert s.contains_many([items[0][0]]) == [False]
    assert os.path.exists(tmp)
    s.put_many([page(9)])
    assert not os.path.exists(tmp) and os.path.exists(other)
    s.close()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="writers"):
        PackStore(tmp_path, writers=0)
    s = PackStore(tmp_path)
    with pytest.raises(TypeError, match="head"):
        s.get_into(["a"], torch.zeros(1, 4, dtype=torch.uint8), head=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="out must be"):
        s.get_into(["a", "b"], torch.zeros(1, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="invalid block-store key"):
        s.put_many([("bad key", b"x")])
    with pytest.raises(TypeError):
        s.put_many([(page(0)[0], "not bytes")])
    assert list(s.keys("")) == []
    assert os.listdir(tmp_path) == []  # refused writes created nothing, not even packs/
    s.close()


def test_snapshot_save_writes_one_pack_per_chunk_and_fork_adds_none(tmp_path):
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float16)
    pager = SyntheticPager(layout, 64)
    pager.allocate("a", list(range(100)))
    pager.fill_random("a", torch.Generator().manual_seed(0))
    bpb = layout.bytes_per_block
    with SnapshotStore(tmp_path, chunk_bytes=10 * bpb) as store:
        info = store.save(pager, name="s")
        assert len(packs(tmp_path)) == 3  # 25 pages in chunks of 10
        store.fork("s", "t")
        assert len(packs(tmp_path)) == 3
        store.save(pager, name="again")  # every page already stored: nothing written
        assert len(packs(tmp_path)) == 3 and info.num_pages == 25
        dst = SyntheticPager(layout, 64)
        store.load(dst, "t")
        store.delete("s")
        store.delete("t")
        store.delete("again")
        assert store.gc().pages_deleted == 25 and packs(tmp_path) == []


def test_gc_rewrites_a_pack_that_still_holds_referenced_pages(tmp_path):
    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float16)
    pager = SyntheticPager(layout, 64)
    gen = torch.Generator().manual_seed(3)
    for sid, start in (("x", 0), ("y", 1000)):
        pager.allocate(sid, list(range(start, start + 40)))  # 10 pages each
        pager.fill_random(sid, gen)
    with SnapshotStore(tmp_path) as store:
        store.save(pager, name="both")  # one pack, 20 pages
        store.fork("both", "only-y", seq_ids=["y"])
        store.delete("both")
        (old,) = packs(tmp_path)
        report = store.gc()
        assert report.pages_deleted == 10 and report.pages_kept == 10
        assert report.bytes_freed == 10 * layout.bytes_per_block
        (new,) = packs(tmp_path)
        assert new != old  # the pack was rewritten with y's pages only
    with SnapshotStore(tmp_path) as fresh:
        assert fresh.verify("only-y").ok
        dst = SyntheticPager(layout, 64)
        fresh.load(dst, "only-y", {"y": "y2"})
        table = pager.block_table("y")
        assert torch.equal(dst.read_blocks(dst.block_table("y2")), pager.read_blocks(table))


def test_rewrite_of_a_pack_truncated_under_the_store_keeps_the_whole_pages(tmp_path):
    s = PackStore(tmp_path)
    items = [page(i) for i in range(4)]  # 1000 bytes each, back to back
    s.put_many(items)
    (name,) = packs(tmp_path)
    with open(os.path.join(tmp_path, PACK_DIR, name), "r+b") as f:
        f.truncate(3500)  # page 3 (bytes 3000-3999) is cut, the index and footer are gone
    assert s.delete_many([items[0][0]]) == 1
    assert s.get_many([k for k, _ in items]) == [None, items[1][1], items[2][1], None]
    fresh = PackStore(tmp_path)  # the rewritten pack verifies
    assert sorted(fresh.keys("")) == sorted([items[1][0], items[2][0]])
    s.close()
    fresh.close()
