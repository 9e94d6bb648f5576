"""Snapshots: round trips, dedup, fork, mismatches, names, gc, rollback (SyntheticPager)."""

from __future__ import annotations

import json

import pytest
import torch

from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot import SnapshotStore
from pagedkv.snapshot.leases import new_lease
from pagedkv.snapshot.manifest import parse_manifest
from pagedkv.snapshot.store import MANIFEST_PREFIX, page_key
from pagedkv.storage.layout import KVLayout
from pagedkv.testing import SyntheticPager

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)
BPB = LAYOUT.bytes_per_block  # 512


def seq_kv(pager, seq_id) -> torch.Tensor:
    """The KV bytes of a sequence's tokens: [layer*2, num_tokens, head*dim bytes]."""
    table, n = pager.block_table(seq_id), pager.num_tokens(seq_id)
    rows = pager.read_blocks(table).view(len(table), 2 * LAYOUT.num_layers, LAYOUT.block_size, -1)
    return rows.permute(1, 0, 2, 3).reshape(2 * LAYOUT.num_layers, -1, rows.shape[-1])[:, :n]


def make_pager(num_blocks=64, seed=0, fingerprint="synthetic", layout=LAYOUT):
    return SyntheticPager(
        layout, num_blocks, fingerprint=fingerprint
    ), torch.Generator().manual_seed(seed)


def add_seq(pager, gen, seq_id, tokens, salt=None):
    pager.allocate(seq_id, tokens, salt=salt)
    pager.fill_random(seq_id, gen)


@pytest.fixture
def store(tmp_path):
    with SnapshotStore(tmp_path / "snaps") as s:
        yield s


def assert_restored(src, dst, mapping):
    for old, new in mapping.items():
        assert dst.token_ids(new) == src.token_ids(old)
        assert dst.salt(new) == src.salt(old)
        assert torch.equal(seq_kv(dst, new), seq_kv(src, old)), f"KV of {old!r} differs"


def test_round_trip_bit_exact_into_other_pool_and_block_ids(store):
    src, gen = make_pager(64)
    add_seq(src, gen, "a", list(range(10)))
    add_seq(src, gen, 7, list(range(8)) + [99, 100, 101], salt="tenant-1")
    add_seq(src, gen, "c", [5] * 4)  # exactly one full block
    info = store.save(src, name="s1", metadata={"user": "ada"})
    assert info.seq_ids == ["a", 7, "c"] and info.num_tokens == 25
    assert info.metadata == {"user": "ada"} and info.seconds > 0

    dst = SyntheticPager(LAYOUT, 23)
    add_seq(dst, gen, "other", list(range(1000, 1030)))  # occupies the low block ids
    mapping = store.load(dst, "s1")
    assert mapping == {"a": "s1:a", 7: "s1:7", "c": "s1:c"}
    assert mapping.bytes > 0 and mapping.seconds > 0
    assert set(dst.block_table("s1:a")).isdisjoint(src.block_table("a"))  # other block ids
    assert_restored(src, dst, mapping)
    dst.check_integrity()
    # a mapping argument restores only those sequences, under the given ids
    again = store.load(dst, "s1", {7: 1234})
    assert dict(again) == {7: 1234}
    assert_restored(src, dst, again)


def test_restored_pages_share_cached_prefix_blocks(store):
    src, gen = make_pager()
    add_seq(src, gen, "a", list(range(17)))  # 4 full blocks + 1
    store.save(src, name="s")
    dst = SyntheticPager(LAYOUT, 32)
    first = store.load(dst, "s", {"a": "x"})
    free_before = dst.num_free_blocks
    second = store.load(dst, "s", {"a": "y"})
    assert second.shared_blocks == 4  # the cached prefix is shared, not rewritten
    assert free_before - dst.num_free_blocks == 1
    assert dst.block_table("y")[:4] == dst.block_table("x")[:4]
    assert first.shared_blocks == 0
    assert_restored(src, dst, {"a": "y"})


def test_last_page_tail_is_canonical(store):
    """Stale bytes past the last token never reach the store: equal KV, equal digest."""
    src, gen = make_pager()
    add_seq(src, gen, "a", [1, 2, 3, 4, 5, 6])
    table = src.block_table("a")
    junk = torch.randint(0, 256, (1, BPB), dtype=torch.uint8, generator=gen)
    view = junk.view(4, 4, -1)
    view[:, :2] = src.read_blocks(table[1:]).view(4, 4, -1)[:, :2]  # keep the 2 real tokens
    before = store.save(src, name="one").unique_bytes
    src.write_blocks(table[1:], junk)
    info = store.save(src, name="two")
    assert info.written_bytes == 0 and before == info.unique_bytes


def test_dedup_eight_branches_share_their_prefix(store):
    """8 branches of a 64-block prefix, each with 2 own blocks: prefix stored once."""
    src, gen = make_pager(num_blocks=64 + 8 * 2 + 4)
    prefix = list(range(64 * 4))
    add_seq(src, gen, "root", prefix + [7])
    for b in range(8):
        tail = [10_000 + b * 100 + i for i in range(2 * 4)]
        add_seq(src, gen, f"b{b}", prefix + tail)
        assert src.block_table(f"b{b}")[:64] == src.block_table("root")[:64]
    info = store.save(src, name="tree")
    expect = (64 + 1 + 8 * 2) * BPB  # prefix once + root's last page + own blocks
    assert info.unique_bytes == expect and info.written_bytes == expect
    assert info.logical_bytes == (65 + 8 * 66) * BPB
    assert info.dedup_ratio == pytest.approx((65 + 8 * 66) / (64 + 1 + 16))
    # a second save of one branch adds nothing; a fork adds no page at all
    assert store.save(src, ["b3"], name="b3").written_bytes == 0
    assert store.fork("tree", "tree2", seq_ids=["b1"]).written_bytes == 0
    total = sum(1 for k in store.backend.keys("") if k.endswith(".pg"))
    assert total == 64 + 1 + 16


def test_branch_continues_from_a_restored_conversation(store):
    """Save one sequence, restore it elsewhere, extend it: the saved prefix is intact."""
    src, gen = make_pager()
    add_seq(src, gen, 42, list(range(11)))
    store.save(src, [42], name="chat")
    dst = SyntheticPager(LAYOUT, 16)
    m = store.load(dst, "chat", {42: "req-9"})
    tokens = dst.token_ids("req-9") + [500, 501]
    dst.free("req-9")  # the engine would append instead; re-allocate to extend here
    cached = dst.allocate("req-9b", tokens)
    assert cached == 8  # the 2 full blocks restored before are shared
    assert m == {42: "req-9"}


def test_layout_and_fingerprint_mismatch_name_both(store):
    src, gen = make_pager(fingerprint="llama-8b@v1")
    add_seq(src, gen, "a", list(range(9)))
    store.save(src, name="s")
    other = SyntheticPager(KVLayout(2, 2, 8, 8, torch.float16), 16, fingerprint="llama-8b@v1")
    with pytest.raises(SnapshotError) as e:
        store.load(other, "s")
    assert "block_size 4" in str(e.value) and "block_size 8" in str(e.value)
    wrong = SyntheticPager(LAYOUT, 16, fingerprint="llama-8b@v2")
    with pytest.raises(SnapshotError) as e:
        store.load(wrong, "s")
    assert "'llama-8b@v1'" in str(e.value) and "'llama-8b@v2'" in str(e.value)
    assert wrong.seq_ids() == [] and other.seq_ids() == []


def test_future_version_and_foreign_documents_are_refused(store):
    src, gen = make_pager()
    add_seq(src, gen, "a", [1, 2, 3])
    store.save(src, name="s")
    doc = json.loads(store.backend.get_many([MANIFEST_PREFIX + "s"])[0])
    doc["version"] = 2
    store.backend.put_many([(MANIFEST_PREFIX + "s", json.dumps(doc).encode())])
    with pytest.raises(SnapshotError, match="version 2.*upgrade pagedkv"):
        store.load(SyntheticPager(LAYOUT, 8), "s")
    assert "version 2" in store.verify("s").error
    with pytest.raises(SnapshotError, match="not a pagedkv snapshot"):
        parse_manifest(json.dumps({"format": "other"}).encode())
    with pytest.raises(SnapshotError, match="not valid JSON"):
        parse_manifest(b"\x80\x04pickle")


def test_names_overwrite_and_generated(store):
    src, gen = make_pager()
    add_seq(src, gen, "a", [1, 2, 3])
    for bad in ["", "../x", "a/b", "x" * 129, "-lead", "sp ace"]:
        with pytest.raises(ValueError, match="invalid snapshot name"):
            store.save(src, name=bad)
    store.save(src, name="s")
    with pytest.raises(SnapshotError, match="already exists.*overwrite=True"):
        store.save(src, name="s")
    store.save(src, name="s", overwrite=True, metadata={"v": 2})
    assert store.info("s").metadata == {"v": 2}
    auto = store.save(src)
    assert auto.name.startswith("snap-") and auto.name in store.names()
    with pytest.raises(TypeError, match="JSON"):
        store.save(src, name="m", metadata={"t": object()})
    with pytest.raises(KeyError, match="not in the pager"):
        store.save(src, ["nope"], name="m")
    with pytest.raises(SnapshotError, match="no snapshot named 'zzz'"):
        store.load(src, "zzz")


def test_list_info_fork_delete_gc(store):
    src, gen = make_pager()
    add_seq(src, gen, "a", list(range(9)))
    add_seq(src, gen, "b", list(range(100, 109)))
    store.save(src, ["a"], name="sa")
    store.save(src, ["b"], name="sb")
    store.fork("sa", "sa2", metadata={"branch": 2})
    assert [i.name for i in store.list()] == ["sa", "sb", "sa2"]
    assert store.info("sa2").parent == "sa" and store.info("sa2").metadata == {"branch": 2}
    store.delete("sa")
    assert store.gc().pages_deleted == 0  # sa2 still references every page of sa
    store.delete("sa2")
    r = store.gc()
    assert r.pages_deleted == 3 and r.bytes_freed == 3 * BPB and r.pages_kept == 3
    assert store.verify("sb").ok
    with pytest.raises(SnapshotError):
        store.delete("sa")


def test_gc_keeps_pages_of_live_leases(store):
    """A save in progress (its lease written, manifest not yet) keeps its pages."""
    src, gen = make_pager()
    add_seq(src, gen, "a", list(range(9)))
    store.save(src, name="s")
    digests = sorted(store.manifest("s").page_digests())
    store.backend.delete_many([MANIFEST_PREFIX + "s"])  # as if the manifest were not written yet
    lease = new_lease("snap.l.test.000000", "s", digests)  # held by this live process
    store.backend.put_many([("snap.l.test.000000", lease.encode())])
    r = store.gc()
    assert r.pages_deleted == 0 and r.pages_protected == 3
    store.backend.delete_many(["snap.l.test.000000"])
    assert store.gc().pages_deleted == 3


def test_out_of_blocks_midway_rolls_back(store):
    src, gen = make_pager()
    add_seq(src, gen, "a", list(range(12)))  # 3 blocks
    add_seq(src, gen, "b", list(range(50, 70)))  # 5 blocks
    store.save(src, name="s")
    dst = SyntheticPager(LAYOUT, 6)
    add_seq(dst, gen, "keep", [9, 9])
    before, kv_keep = dst.state(), seq_kv(dst, "keep")
    with pytest.raises(OutOfBlocks, match="nothing was restored"):
        store.load(dst, "s")
    # the sequences and their KV are as before and every block is free or evictable
    # again; the rolled-back blocks stay in the prefix cache with their (valid) KV, as
    # after any free()
    after = dst.state()
    assert after["seqs"] == before["seqs"]
    assert torch.equal(seq_kv(dst, "keep"), kv_keep)
    assert dst.num_free_blocks == 5
    dst.check_integrity()


def test_paused_pager_refuses_mutations_during_save(store, monkeypatch):
    src, gen = make_pager()
    add_seq(src, gen, "a", list(range(9)))
    seen = []
    real = src.read_blocks

    def spy(ids):
        with pytest.raises(RuntimeError, match="paused"):
            src.allocate("intruder", [1])
        seen.append(len(ids))
        return real(ids)

    monkeypatch.setattr(src, "read_blocks", spy)
    store.save(src, name="s")
    assert seen and "intruder" not in src.seq_ids()
    src.allocate("after", [1])  # mutations work again after the save


def test_progress_and_small_chunks(tmp_path):
    """Chunked pipelining (several leases) and rich progress bars give the same snapshot."""
    src, gen = make_pager(num_blocks=200)
    for i in range(6):
        add_seq(src, gen, i, list(range(i * 1000, i * 1000 + 57)))
    with SnapshotStore(tmp_path / "a", chunk_bytes=3 * BPB, threads=3, durable=True) as s:
        info = s.save(src, name="s", progress=True)
        assert info.unique_pages == 6 * 15
        dst = SyntheticPager(LAYOUT, 100)
        assert_restored(src, dst, s.load(dst, "s", progress=True))
        assert s.verify("s", progress=True).ok
        assert list(s.backend.keys("snap.l.")) == []  # leases dropped after the save


def test_memory_store_backend():
    from pagedkv.stores import MemoryStore

    src, gen = make_pager()
    add_seq(src, gen, "a", list(range(9)))
    s = SnapshotStore(MemoryStore(1 << 20, slot_bytes=1 << 14))
    s.save(src, name="s")
    dst = SyntheticPager(LAYOUT, 8)
    assert_restored(src, dst, s.load(dst, "s"))


@pytest.mark.redis
def test_round_trip_through_redis(redis_url):
    src, gen = make_pager()
    add_seq(src, gen, "a", list(range(30)))
    add_seq(src, gen, 3, list(range(29)) + [77], salt=b"\x01salt")
    with SnapshotStore(redis_url) as s:
        info = s.save(src, name="r", metadata={"via": "redis"})
        password = redis_url.split(":")[2].split("@")[0]
        assert password not in s.location
        assert info.unique_pages == 8 + 8  # the salt keeps the second sequence unshared
        dst = SyntheticPager(LAYOUT, 40)
        assert_restored(src, dst, s.load(dst, "r"))
        assert s.verify("r").ok
        s.fork("r", "r2")
        s.backend.delete_many([page_key(sorted(s.manifest("r").page_digests())[0])])
        assert len(s.verify("r").missing) == 1
        with pytest.raises(SnapshotError, match="1 missing"):
            s.load(SyntheticPager(LAYOUT, 40), "r")
        with pytest.raises(SnapshotError, match="cannot fork"):
            s.fork("r", "r3")
        s.delete("r")
        s.delete("r2")
        assert s.gc().pages_deleted == 15 and s.list() == []


def test_gc_marker_of_a_dead_gc_blocks_nothing_and_is_removed(store):
    src, gen = make_pager()
    add_seq(src, gen, "a", list(range(9)))
    dead = new_lease("snap.g.dead", "gc", [])
    dead = type(dead)(dead.lease_id, "gc", dead.created, dead.host, 999_999_999, [])  # no such pid
    store.backend.put_many([("snap.g.dead", dead.encode())])
    store.save(src, name="s")  # does not wait for the dead gc
    assert store.gc().leases_removed == 1
    assert list(store.backend.keys("snap.g.")) == []
    assert store.verify("s").ok


def test_moved_names_still_import_from_where_they_were():
    import pagedkv.snapshot as snapshot
    import pagedkv.snapshot.packs as old_packs
    import pagedkv.snapshot.pager as pager_module
    import pagedkv.stores as stores
    import pagedkv.testing as testing

    assert snapshot.SyntheticPager is pager_module.SyntheticPager is testing.SyntheticPager
    assert old_packs.PackStore is stores.PackStore and old_packs.PACK_DIR == "packs"
    assert stores.digest_hex is stores.sha256_hex and stores.digest_hex(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
