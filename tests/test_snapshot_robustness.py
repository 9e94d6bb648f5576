"""Snapshot stores under hostile input: malformed manifests, leases and markers, damaged
entries, bad arguments, read-only stores and unknown locations (issue 11, points 5, 6,
8, 9, 12). The property-based fuzzing of the same documents is test_snapshot_fuzz.py."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch

from pagedkv.errors import SnapshotError, SnapshotVersionError
from pagedkv.snapshot import SnapshotStore
from pagedkv.snapshot.leases import new_lease, parse_lease
from pagedkv.snapshot.manifest import _checksum, parse_manifest
from pagedkv.snapshot.store import MANIFEST_PREFIX, page_key
from pagedkv.storage.layout import KVLayout
from pagedkv.testing import SyntheticPager

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype=torch.float16)
DIGEST = "ab" * 32


def _pager(seed: int = 0) -> SyntheticPager:
    gen = torch.Generator().manual_seed(seed)
    pager = SyntheticPager(LAYOUT, 32)
    for sid, tokens in [("a", range(10)), (7, range(50, 55))]:
        pager.allocate(sid, list(tokens), salt="t" if sid == 7 else None)
        pager.fill_random(sid, gen)
    return pager


@pytest.fixture
def store(tmp_path):
    with SnapshotStore(tmp_path / "store") as s:
        s.save(_pager(), name="good")
        yield s


def _doc(store, name: str = "good") -> dict:
    return json.loads(store.backend.get_many([MANIFEST_PREFIX + name])[0])


def _signed(doc: dict) -> bytes:
    """``doc`` with its checksum recomputed: a hand edit that the checksum cannot catch."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return json.dumps({**body, "checksum": _checksum(body)}).encode()


def _set(doc: dict, path: str, value) -> dict:
    out = copy.deepcopy(doc)
    *head, last = path.split(".")
    node = out
    for part in head:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


# -- point 5: malformed manifests are SnapshotErrors naming the field ----------------------

RAW_CASES = {
    "deep nesting": b'{"format":"pagedkv.snapshot","version":1,"metadata":' + b"[" * 100_000,
    "5000-digit int": b'{"format":"pagedkv.snapshot","version":1,"created":' + b"9" * 5000 + b"}",
    "1e400": b'{"format":"pagedkv.snapshot","version":1,"created":1e400}',
    "Infinity": b'{"format":"pagedkv.snapshot","version":1,"created":Infinity}',
    "NaN": b'{"format":"pagedkv.snapshot","version":1,"created":NaN}',
    "duplicate key": b'{"format":"pagedkv.snapshot","format":"x","version":1}',
    "lone surrogate": b'{"format":"pagedkv.snapshot","version":1,"name":"\\ud800"}',
    "UTF-16": '{"format":"pagedkv.snapshot","version":1}'.encode("utf-16"),
    "not an object": b"[1, 2, 3]",
    "empty": b"",
    "pickle": b"\x80\x04\x95pickle",
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_damage_is_a_snapshot_error(case):
    with pytest.raises(SnapshotError):
        parse_manifest(RAW_CASES[case])
    with pytest.raises(SnapshotError):
        parse_lease(RAW_CASES[case].replace(b"pagedkv.snapshot", b"pagedkv.snapshot.lease"))


# (path, value, words the error must contain): every edit re-signed, so only the schema
# stands between it and the reader.
FIELD_CASES = [
    ("created", 1e300, "'created'"),
    ("created", -5, "'created'"),
    ("created", "yesterday", "'created'"),
    ("layout.bytes_per_block", 0, "'layout.bytes_per_block'"),
    ("layout.bytes_per_block", 100, "'layout.bytes_per_block'"),
    ("layout.block_size", 0, "'layout.block_size'"),
    ("layout.block_size", 2**40, "'layout.block_size'"),
    ("layout.num_layers", True, "'layout.num_layers'"),
    ("layout.dtype", "float16\n", "'layout.dtype'"),
    ("layout", [], "'layout'"),
    ("sequences.0.pages.0", DIGEST + "\n", "'sequences[0].pages[0]'"),
    ("sequences.0.pages.0", DIGEST.upper(), "'sequences[0].pages[0]'"),
    ("sequences.0.pages", {"a": 1}, "'sequences[0].pages'"),
    ("sequences.0.token_ids.3", -1, "'sequences[0].token_ids[3]'"),
    ("sequences.0.token_ids.3", 2**32, "'sequences[0].token_ids[3]'"),
    ("sequences.0.token_ids.3", 1.5, "'sequences[0].token_ids[3]'"),
    ("sequences.0.token_ids", [], "'sequences[0].token_ids'"),
    ("sequences.0.num_tokens", 10**19, "'sequences[0].num_tokens'"),
    ("sequences.0.last_page_fill", True, "'sequences[0].last_page_fill'"),
    ("sequences.0.seq_id", None, "'sequences[0].seq_id'"),
    ("sequences.0.seq_id", 2**63, "'sequences[0].seq_id'"),
    ("sequences.1.salt", {"type": "bytes", "value": "zz"}, "'sequences[1].salt.value'"),
    ("sequences.1.salt", {"type": "pickle", "value": "x"}, "'sequences[1].salt.type'"),
    ("sequences.1.salt", "t", "'sequences[1].salt'"),
    ("sequences.0", "seq", "'sequences[0]'"),
    ("sequences", {}, "'sequences'"),
    ("bytes.logical", -1, "'bytes.logical'"),
    ("bytes.written", 2**64, "'bytes.written'"),
    ("save.seconds", "slow", "'save.seconds'"),
    ("metadata", [1], "'metadata'"),
    ("parent", "../x", "'parent'"),
    ("name", "good\n", "'name'"),
    ("fingerprint", 5, "'fingerprint'"),
    ("model", ["m"], "'model'"),
    ("page_hash", "md5", "'page_hash'"),
]


@pytest.mark.parametrize(("path", "value", "words"), FIELD_CASES, ids=lambda c: str(c)[:30])
def test_each_field_is_checked_and_named(store, path, value, words):
    raw = _signed(_set(_doc(store), path, value))
    with pytest.raises(SnapshotError) as e:
        parse_manifest(raw, what="doc")
    assert words in str(e.value)


def test_removed_fields_and_the_unedited_manifest(store):
    doc = _doc(store)
    assert parse_manifest(_signed(doc)).name == "good"  # re-signing alone changes nothing
    for key in ("name", "created", "layout", "sequences", "fingerprint", "page_unit"):
        body = {k: v for k, v in doc.items() if k != key}
        with pytest.raises(SnapshotError, match=f"'{key}'"):
            parse_manifest(_signed(body))
    with pytest.raises(SnapshotVersionError, match="upgrade pagedkv"):
        parse_manifest(_signed({**doc, "version": 2}))


def test_lease_fields_are_checked():
    good = new_lease("snap.l.x.000000", "s", [DIGEST])
    doc = json.loads(good.encode())
    assert parse_lease(good.encode()) == good
    for key, value in [
        ("pid", -1),  # os.kill(-1, 0) would probe every process
        ("pid", 0),
        ("pid", 2**40),
        ("created", 1e300),
        ("pages", [DIGEST + "\n"]),
        ("lease_id", "a/b"),
        ("host", None),
        ("name", 3),
    ]:
        with pytest.raises(SnapshotError, match=f"'{key}"):
            parse_lease(json.dumps({**doc, key: value}).encode())


# -- point 6: one damaged entry never breaks the store ----------------------------------


def _orphan_and_damage(store) -> str:
    """A second snapshot whose pages only it holds, deleted (orphans); and a damaged
    manifest. Returns the orphan page digest."""
    p = _pager(seed=3)
    store.save(p, ["a"], name="gone")
    orphans = store.manifest("gone").page_digests() - store.manifest("good").page_digests()
    store.delete("gone")
    store.backend.put_many([(MANIFEST_PREFIX + "bad", b"[" * 50_000)])
    return sorted(orphans)[0]


def test_list_verify_gc_report_a_damaged_manifest_and_go_on(store, caplog):
    orphan = _orphan_and_damage(store)
    with caplog.at_level(logging.WARNING, logger="pagedkv.snapshot"):
        assert [i.name for i in store.list()] == ["good"]
    assert "'bad'" in caplog.text and "nests" in caplog.text
    cat = store.catalogue()
    assert [d.name for d in cat.damaged] == ["bad"] and not cat.damaged[0].newer_version
    assert [i.name for i in cat.snapshots] == ["good"] and cat.pages == 3 + 2
    report = store.verify("bad")  # never raises on damage
    assert not report.ok and "nests" in report.error
    assert store.verify("good").ok
    with pytest.raises(SnapshotError, match="nests"):
        store.load(SyntheticPager(LAYOUT, 8), "bad")
    # gc cannot know the damaged manifest's pages: it deletes none, and says so
    with caplog.at_level(logging.WARNING, logger="pagedkv.snapshot"):
        gc = store.gc()
    assert gc.blocked and [d.name for d in gc.damaged] == ["bad"] and gc.pages_deleted == 0
    assert "deleted no page" in caplog.text
    assert store.backend.contains_many([page_key(orphan)]) == [True]
    # drop_damaged deletes it, then collects
    gc = store.gc(drop_damaged=True)
    assert gc.dropped == ["bad"] and not gc.blocked and gc.pages_deleted >= 1
    assert store.backend.contains_many([page_key(orphan)]) == [False]
    assert store.names() == ["good"] and store.verify("good").ok


def test_a_newer_version_manifest_is_never_dropped_and_blocks_gc(store):
    _orphan_and_damage(store)
    doc = {**_doc(store), "version": 99, "name": "future"}
    store.backend.put_many([(MANIFEST_PREFIX + "future", _signed(doc))])
    cat = store.catalogue()
    assert {d.name: d.newer_version for d in cat.damaged} == {"bad": False, "future": True}
    gc = store.gc(drop_damaged=True)
    assert gc.dropped == ["bad"] and [d.name for d in gc.damaged] == ["future"]
    assert gc.blocked and gc.pages_deleted == 0 and "future" in store.names()


def test_a_copied_manifest_and_an_unreadable_entry_are_damaged(store, monkeypatch):
    from pagedkv.stores import disk_layout

    raw = store.backend.get_many([MANIFEST_PREFIX + "good"])[0]
    store.backend.put_many([(MANIFEST_PREFIX + "copy", raw), (MANIFEST_PREFIX + "dir", raw)])
    # a directory where a manifest file would be is not an entry of the store (a foreign
    # object, never read nor reported; DiskStore layout: <fan>/<key>.v)
    os.makedirs(os.path.join(store.backend.path, "snr", MANIFEST_PREFIX + "foreign.v"))
    # an entry that cannot be read at all (an I/O or permission error on open)
    real_open = disk_layout.open_regular

    def failing_open(path):
        if path.endswith(MANIFEST_PREFIX + "dir.v"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path)

    monkeypatch.setattr(disk_layout, "open_regular", failing_open)
    cat = store.catalogue()
    errors = {d.name: d.error for d in cat.damaged}
    assert set(errors) == {"copy", "dir"}, errors
    assert "copied or renamed" in errors["copy"] and "cannot be read" in errors["dir"]
    assert not store.verify("dir").ok and store.gc().blocked


@pytest.mark.parametrize("prefix", ["snap.l.bad.000000", "snap.g.bad"])
@pytest.mark.parametrize("value", [b"[" * 100_000, b'{"format":"pagedkv.snapshot.lease"', b"\xff"])
def test_damaged_lease_or_marker_is_stale_not_fatal(store, prefix, value, caplog):
    store.backend.put_many([(prefix, value)])
    store.save(_pager(seed=5), name="next")  # does not raise, and does not wait
    store.fork("next", "next2")
    with caplog.at_level(logging.WARNING, logger="pagedkv.snapshot"):
        gc = store.gc()
    assert gc.leases_removed == 1 and not gc.blocked
    assert list(store.backend.keys(prefix)) == [] and prefix in caplog.text
    assert all(store.verify(n).ok for n in ("good", "next", "next2"))


# -- point 8: arguments are checked before anything is written ------------------------


def test_bad_arguments_raise_before_anything_is_written(tmp_path):
    pager = _pager()
    s = SnapshotStore(tmp_path / "new")
    calls = {
        "save str ids": (
            lambda: s.save(pager, "chat"),
            TypeError,
            r"for one sequence pass \['chat'\]",
        ),
        "save bytes ids": (lambda: s.save(pager, b"ab"), TypeError, "list of sequence ids"),
        "save mapping": (lambda: s.save(pager, {"a": 1}), TypeError, "load"),
        "save int": (lambda: s.save(pager, 7), TypeError, "list of sequence ids"),
        "save dup": (lambda: s.save(pager, ["a", "a"]), ValueError, "duplicates"),
        "save huge id": (lambda: s.save(pager, [2**70]), ValueError, "64 bits"),
        "save unknown": (lambda: s.save(pager, ["zz"]), KeyError, "not in the pager"),
        "save name int": (lambda: s.save(pager, name=5), TypeError, "must be a str"),
        "save name nl": (lambda: s.save(pager, name="x\n"), ValueError, "invalid snapshot name"),
        "save meta list": (lambda: s.save(pager, metadata=[1]), TypeError, "mapping"),
        "save meta key": (lambda: s.save(pager, metadata={1: 2}), TypeError, "not a str"),
        "save meta nan": (
            lambda: s.save(pager, metadata={"x": float("nan")}),
            ValueError,
            "finite",
        ),
        "save meta int": (lambda: s.save(pager, metadata={"x": 10**30}), ValueError, "digits"),
        "save meta deep": (lambda: s.save(pager, metadata={"x": _nested(40)}), ValueError, "nests"),
        "save meta obj": (lambda: s.save(pager, metadata={"x": object()}), TypeError, "JSON"),
        "save overwrite": (lambda: s.save(pager, overwrite="no"), TypeError, "True or False"),
        "save not pager": (lambda: s.save("cache", ["a"]), TypeError, "CachePager"),
        "load list": (lambda: s.load(pager, "x", ["a"]), TypeError, "saved id: new id"),
        "load str": (lambda: s.load(pager, "x", "a"), TypeError, "saved id: new id"),
        "load unhashable": (lambda: s.load(pager, "x", {"a": []}), TypeError, "hashable"),
        "fork str ids": (lambda: s.fork("x", "y", seq_ids="a"), TypeError, "list of sequence"),
        "verify name": (lambda: s.verify(None), TypeError, "must be a str"),
        "delete name": (lambda: s.delete("a b"), ValueError, "invalid snapshot name"),
        "gc grace": (lambda: s.gc(grace_seconds=-1), ValueError, ">= 0"),
        "gc drop": (lambda: s.gc(drop_damaged=1), TypeError, "True or False"),
    }
    for what, (call, exc, words) in calls.items():
        with pytest.raises(exc, match=words):
            call()
        assert not os.path.exists(tmp_path / "new"), what  # nothing written, not even the dir
    for kw, exc in [
        ({"chunk_bytes": 1.5}, TypeError),
        ({"threads": 0}, ValueError),
        ({"writers": True}, TypeError),
        ({"grace_seconds": float("nan")}, ValueError),
        ({"durable": "yes"}, TypeError),
        ({"key_prefix": 3}, TypeError),
    ]:
        with pytest.raises(exc):
            SnapshotStore(tmp_path / "new", **kw)
    assert os.listdir(tmp_path) == []


def _nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_what_saves_loads_back(tmp_path):
    """Metadata at the limits is accepted and reads back equal (never an unreadable save)."""
    pager = _pager()
    meta = {"deep": _nested(30), "big": 10**19, "pi": 3.14, "s": "é\U0001f600", "t": (1, 2)}
    with SnapshotStore(tmp_path) as s:
        s.save(pager, name="m", metadata=meta)
        assert s.info("m").metadata == {**meta, "t": [1, 2]}


# -- point 9: reading creates and changes nothing ------------------------------------


def _tree(root) -> dict:
    """Every file and directory under ``root`` with its size, mtime and bytes."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.join(dirpath, d)] = "dir"
        for f in files:
            path = os.path.join(dirpath, f)
            st = os.stat(path)
            with open(path, "rb") as fh:
                out[path] = (st.st_size, st.st_mtime_ns, fh.read())
    return out


def test_a_missing_store_is_empty_and_stays_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = SnapshotStore("typo")
    assert not s.exists and s.list() == [] and s.names() == []
    assert s.catalogue().damaged == [] and not s.verify("x").ok
    with pytest.raises(SnapshotError, match="no snapshot named 'x'.*no store there yet"):
        s.load(SyntheticPager(LAYOUT, 8), "x")
    with pytest.raises(SnapshotError, match="no snapshot named"):
        s.delete("x")
    assert s.gc().pages_deleted == 0
    s.close()
    assert os.listdir(tmp_path) == []


def test_reads_leave_an_existing_store_byte_for_byte_unchanged(store):
    root = store.backend.path
    # a dead writer's temp file: only a write (which sweeps) may remove it
    tmp = os.path.join(root, "snr", "snap.m.x.999999999.abcdef.tmp")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(b"partial")
    before = _tree(root)
    with SnapshotStore(root) as fresh:
        assert [i.name for i in fresh.list()] == ["good"] and fresh.verify("good").ok
        fresh.info("good")
        fresh.load(SyntheticPager(LAYOUT, 16), "good")
        with pytest.raises(SnapshotError):
            fresh.delete("nope")
    assert _tree(root) == before  # not a byte, not an mtime (no LRU stamps), no sweep


class _ReadOnlyFS:
    """Every call that would create, modify or remove a file fails with EROFS: what a
    read-only mount does (tests run as root, which ignores permission bits)."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self, monkeypatch):
        import builtins
        import errno

        self.attempts: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def refuse(name):
            def fail(*args, **kwargs):
                self.attempts.append(name)
                raise OSError(errno.EROFS, "Read-only file system")

            return fail

        def os_open(path, flags, *args, **kwargs):
            if flags & self.WRITE_FLAGS:
                return refuse("os.open")()
            return real_os_open(path, flags, *args, **kwargs)

        def py_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                return refuse("open")()
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", py_open)
        for name in ("mkdir", "makedirs", "replace", "rename", "unlink", "remove", "utime"):
            monkeypatch.setattr(os, name, refuse(f"os.{name}"))


def test_a_read_only_store_can_be_listed_verified_and_loaded(store, monkeypatch):
    root = store.backend.path
    src = _pager()
    fs = _ReadOnlyFS(monkeypatch)
    with SnapshotStore(root) as ro:
        assert ro.exists and [i.name for i in ro.list()] == ["good"]
        assert ro.verify("good").ok
        dst = SyntheticPager(LAYOUT, 16)
        mapping = ro.load(dst, "good", {"a": "x", 7: "y"})
        assert dst.token_ids("x") == src.token_ids("a") and mapping == {"a": "x", 7: "y"}
        assert fs.attempts == []
        with pytest.raises(Exception, match="Read-only file system"):
            ro.save(src, name="new")  # a write is refused by the file system, clearly


# -- point 12: one location parser; unknown schemes are refused -------------------------


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("redis+sentinel://host:26379", "unknown scheme 'redis\\+sentinel://'"),
        ("redis+cluster://host:7000,host:7001", None),
        ("s3://bucket/key", "unknown scheme 's3://'"),
        ("Redis://h", None),
        ("redis:localhost:6379", "not 'redis://'"),
        ("memory://", "not a snapshot store location"),
        ("file://otherhost/x", "three slashes"),
        ("", "non-empty"),
    ],
)
def test_unknown_or_misspelled_locations_are_refused(tmp_path, monkeypatch, location, words):
    monkeypatch.chdir(tmp_path)
    if words is None:  # a real Redis (Cluster) URL, any case (never connects)
        SnapshotStore(location).close()
    else:
        with pytest.raises(ValueError, match=words):
            SnapshotStore(location)
    assert os.listdir(tmp_path) == []  # no directory named after the URL


def test_known_schemes_are_listed_and_secrets_never_shown(tmp_path):
    with pytest.raises(ValueError) as e:
        SnapshotStore("redis+sentinel://:hunter2@host:7000")
    assert "redis://" in str(e.value) and "file://" in str(e.value)
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError) as e:
        SnapshotStore("redis::hunter2@host")
    assert "hunter2" not in str(e.value)
    with SnapshotStore(f"file://{tmp_path}/via-url") as s:
        s.save(_pager(), name="u")
    with SnapshotStore(tmp_path / "via-url") as s:
        assert s.names() == ["u"]
    with SnapshotStore("redis://:hunter2@127.0.0.1:1/0") as s:
        assert "hunter2" not in repr(s) and "hunter2" not in s.location


def test_parse_location_is_the_one_parser():
    from pagedkv.stores import STORE_SCHEMES, Location, open_store, parse_location

    assert parse_location("/a/b") == Location("path", "/a/b", None)
    assert parse_location("C:/data") == Location("path", "C:/data", None)  # a drive
    assert parse_location("./redis:x") == Location("path", "./redis:x", None)
    assert parse_location("file:///a%20b") == Location("path", "/a b", "file")
    assert parse_location("REDISS://h:1/2") == Location("redis", "rediss://h:1/2", "rediss")
    assert parse_location("redis://u:pw@h:6379/0").shown == "redis://h:6379/0"
    assert set(STORE_SCHEMES) >= {"file", "memory", "redis", "rediss"}
    with pytest.raises(TypeError):
        parse_location(b"/a")
    with pytest.raises(ValueError, match="unknown scheme"):
        open_store("redis+sentinel://h:7000")


def test_what_a_manifest_cannot_hold_is_refused_before_any_write(tmp_path, monkeypatch):
    import pagedkv.snapshot.save as save_module

    s = SnapshotStore(tmp_path / "new")
    pager = SyntheticPager(LAYOUT, 8)
    pager.allocate(("tuple", 1), [1, 2, 3])
    with pytest.raises(TypeError, match="int or str sequence ids"):
        s.save(pager)  # the pager's own ids are checked too
    pager = SyntheticPager(LAYOUT, 8)
    pager.allocate("big-salt", [1, 2, 3], salt=2**70)
    with pytest.raises(ValueError, match="64 bits"):
        s.save(pager)
    pager = _pager()
    monkeypatch.setattr(save_module, "MAX_DOC_BYTES", 500)
    with pytest.raises(ValueError, match="several snapshots"):
        s.save(pager)
    assert not os.path.exists(tmp_path / "new")


def test_leases_of_other_hosts_live_for_grace_and_not_from_the_far_future(store):
    import time

    from pagedkv.snapshot.leases import Lease

    digest = sorted(store.manifest("good").page_digests())[0]
    store.delete("good")
    now = time.time()
    for key, created in [("snap.l.recent.000000", now - 10), ("snap.l.future.000000", now + 1e6)]:
        lease = Lease(key, "x", created, "elsewhere.invalid", 4242, [digest])
        store.backend.put_many([(key, lease.encode())])
    gc = store.gc(grace_seconds=60)
    assert gc.pages_protected == 1 and gc.leases_removed == 1  # the future one is stale
    assert store.backend.contains_many([page_key(digest)]) == [True]
    assert list(store.backend.keys("snap.l.")) == ["snap.l.recent.000000"]


def test_logging_at_boundaries_with_names_and_bytes_never_metadata(tmp_path, caplog):
    pager = _pager()
    store = SnapshotStore(tmp_path / "s", chunk_bytes=128)  # one lease per page
    with caplog.at_level(logging.DEBUG, logger="pagedkv.snapshot"), store as s:
        s.save(pager, name="base", metadata={"token": "s3cr3t"})
        s.load(SyntheticPager(LAYOUT, 16), "base")
        s.fork("base", "copy")
        s.verify("copy")
        s.delete("base")
        s.gc()
    records = [r for r in caplog.records if r.name == "pagedkv.snapshot"]
    text = [r.getMessage() for r in records]
    assert len(records) == 6, text  # one per operation, not one per page or chunk
    assert all(r.levelno == logging.INFO for r in records)
    assert "saved snapshot 'base'" in text[0] and "5 pages" in text[0] and "640 bytes" in text[0]
    assert "loaded snapshot 'base'" in text[1] and "640 bytes read" in text[1]
    assert "forked snapshot 'base' as 'copy'" in text[2]
    assert "verified snapshot 'copy'" in text[3] and "deleted snapshot 'base'" in text[4]
    assert text[5].startswith("gc of ") and "deleted 0 pages" in text[5]
    assert not any("s3cr3t" in t for t in text)


def test_disk_store_read_only_mode(tmp_path):
    from pagedkv.errors import StoreError
    from pagedkv.stores import DiskStore

    missing = DiskStore(tmp_path / "missing", 1 << 20, read_only=True)
    assert list(missing.keys()) == [] and missing.get_many(["k"]) == [None]
    assert not os.path.exists(tmp_path / "missing")
    with DiskStore(tmp_path / "d", 1 << 20) as rw:
        rw.put_many([("k", b"value"), ("j", b"x" * 10)])
    before = _tree(tmp_path / "d")
    ro = DiskStore(tmp_path / "d", 8, read_only=True)  # over its cap: still evicts nothing
    assert ro.get_many(["k", "j"]) == [b"value", b"x" * 10]
    with pytest.raises(StoreError, match="read_only"):
        ro.put_many([("n", b"1")])
    with pytest.raises(StoreError, match="read_only"):
        ro.delete_many(["k"])
    assert _tree(tmp_path / "d") == before  # no LRU stamp, no eviction, no probe file
