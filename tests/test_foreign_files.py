"""Foreign files: a store or tier directory pre-filled with things pagedkv did not write.

Each test plants unrelated files and folders (``*.tmp`` names at every depth, old-style
temp names, pagedkv-style temp names in places pagedkv never writes, symlinks to files
and folders outside, a dangling symlink, a unix socket, FIFOs, unreadable files and
folders, and non-files named like entries), runs a workload (open, save, gc, eviction,
delete, close, reopen), and compares a snapshot of the tree (names, types, modes,
mtimes, content hashes, link targets) before and after: nothing foreign may differ,
and everything new must be a name pagedkv gives its own files.

What is pagedkv's in a directory is documented in :mod:`pagedkv.stores.disk` (fan
directories of 2-3 characters, ``<key>.v`` regular files in them, temp files named
``.pagedkv-tmp-<host>-<pid>-<random>``) and :mod:`pagedkv.snapshot.packs`
(``packs/<time>-<pid>-<random>.pack``).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedkv import KVCache
from pagedkv.snapshot import SnapshotStore
from pagedkv.storage import KVLayout
from pagedkv.stores import DiskStore
from pagedkv.stores.atomic import host_id
from pagedkv.testing import SyntheticPager
from pagedkv.tiers import DiskTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)
_FAN = re.compile(r"[0-9A-Za-z_-]{2,3}")
_PACK = re.compile(r"[0-9a-f]{16}-[1-9][0-9]*-[0-9a-f]{8}\.pack")


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "link"), (stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):  # fmt: skip
        if test(mode):
            return name
    return "other"


def tree(root: Path) -> dict[str, tuple]:
    """``relative path -> (kind, mode, mtime_ns, size, sha256 | link target)``, never
    following a symlink. Folders are recorded without their mtime: pagedkv's own writes
    change the mtime of the folders it writes in, which is not a change to their files."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = _kind(st.st_mode)
            extra: object = None
            if kind == "link":
                extra = os.readlink(path)
            elif kind == "file":
                with open(path, "rb") as f:  # root reads a chmod 000 file too; others skip it
                    extra = hashlib.sha256(f.read()).hexdigest()
            mtime = None if kind == "dir" else st.st_mtime_ns
            size = st.st_size if kind == "file" else None
            out[os.path.relpath(path, root)] = (kind, stat.S_IMODE(st.st_mode), mtime, size, extra)
    return out


def plant(root: Path, outside: Path, sockets: list[socket.socket]) -> None:
    """Fill ``root`` with foreign things; ``outside`` is a folder symlinks point into."""
    root.mkdir(parents=True, exist_ok=True)
    (outside / "dir").mkdir(parents=True, exist_ok=True)
    (outside / "file.txt").write_bytes(b"outside file")
    (outside / "dir" / "kept.v").write_bytes(b"outside, named like an entry")
    dead, host = _dead_pid(), host_id()
    dead_tmp = f".pagedkv-tmp-{host}-{dead}-0123456789ab"
    for rel, data in {
        "notes.tmp": b"user notes",
        "report.final.tmp": b"report",
        "README": b"readme",
        ".hidden": b"dot file",
        "sub/report.final.tmp": b"nested tmp",
        "sub/data.bin": b"\x00\x01",
        "sub/x.v": b"named like an entry, but in the wrong folder",
        "deep/nested/dir/file.tmp": b"deep tmp",
        "deep/old.12345.abcdef.tmp": b"an old-style temp name",
        f"deep/{dead_tmp}": b"a pagedkv temp name where pagedkv never writes",
        "unreadable.tmp": b"no permission",
        "locked/inside.tmp": b"in an unreadable folder",
        f"{dead_tmp[:-1]}c/inside": b"a folder with a temp name",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.chmod(root / "unreadable.tmp", 0)
    os.chmod(root / "locked", 0)
    os.symlink(outside / "file.txt", root / "link-to-file.tmp")
    os.symlink(outside / "dir", root / "link-to-dir")
    os.symlink(outside / "dir", root / "abc")  # named like a fan directory
    os.symlink(outside / "file.txt", root / dead_tmp)  # a symlink with a sweepable name
    os.symlink("/nonexistent/pagedkv-test", root / "dangling.tmp")
    os.mkfifo(root / "fifo.tmp")
    os.mkfifo(root / "sub" / "pipe.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "sock.tmp"))
    sockets.append(sock)


@pytest.fixture
def foreign(tmp_path):
    """``(plant(root, extra=None), check(root, owned))``: plant foreign things (and call
    ``extra(root)`` to add more), record the tree; then check that it is intact."""
    sockets: list[socket.socket] = []
    outside = tmp_path / "outside"
    before: dict[str, dict] = {}

    def do_plant(root: Path, extra=None) -> None:
        plant(root, outside, sockets)
        if extra is not None:
            extra(root)
        before[str(root)] = tree(root)
        before[str(outside)] = tree(outside)

    def check(root: Path, owned) -> None:
        assert tree(outside) == before[str(outside)], "something outside the store changed"
        after = tree(root)
        old = before[str(root)]
        changed = {p: (old[p], after.get(p)) for p in old if after.get(p) != old[p]}
        assert not changed, f"foreign entries modified or deleted: {changed}"
        new = sorted(p for p in after if p not in old)
        assert [p for p in new if not owned(p)] == [], "pagedkv wrote outside its own names"

    yield do_plant, check
    for s in sockets:
        s.close()
    for rel in ("locked",):  # let pytest clean up
        for d in tmp_path.rglob(rel):
            os.chmod(d, 0o700)


def disk_owned(rel: str) -> bool:
    """A name DiskStore gives its own files: a fan folder, or ``<fan>/<key>.v`` in it."""
    parts = rel.split(os.sep)
    if len(parts) == 1:
        return bool(_FAN.fullmatch(parts[0]))
    if len(parts) == 2 and parts[1].endswith(".v"):
        key = parts[1][:-2]
        return (key[:2] + key[-1]).replace(".", "_") == parts[0]
    return False


def snapshot_owned(rel: str) -> bool:
    parts = rel.split(os.sep)
    if parts[0] == "packs":
        return len(parts) == 1 or (len(parts) == 2 and bool(_PACK.fullmatch(parts[1])))
    return disk_owned(rel)


def test_disk_store_leaves_foreign_files_alone(tmp_path, foreign):
    plant_in, check = foreign
    root = tmp_path / "store"

    def entry_names(root: Path) -> None:
        # non-files named like entries, in a real fan folder: not entries, never touched
        (root / "key").mkdir()
        os.symlink(tmp_path / "outside" / "file.txt", root / "key" / "key.v")
        os.mkfifo(root / "key" / "kexy.v")
        (root / "key" / "ke-y.v").mkdir()

    plant_in(root, entry_names)
    store = DiskStore(root, 10 * 1000)
    assert sorted(store.keys()) == []
    values = {f"k{i:02d}": os.urandom(1000) for i in range(30)}
    for k, v in values.items():  # 30 puts into 10 slots: evictions
        store.put_many([(k, v)])
    assert store.stats().evictions == 20
    assert store.get_many(["k29", "key", "kexy", "ke-y"]) == [values["k29"], None, None, None]
    out = torch.zeros(3, 1000, dtype=torch.uint8)
    assert store.get_into(["key", "kexy", "ke-y"], out) == [False, False, False]
    assert store.contains_many(["key", "kexy", "ke-y"]) == [False, False, False]
    assert store.delete_many(["key", "kexy", "ke-y", "k29"]) == 1
    with pytest.raises(Exception, match="not a file pagedkv wrote"):
        store.put_many([("key", b"over a symlink")])
    store.check_integrity()
    store.close()
    again = DiskStore(root, 5 * 1000)  # reopen: scan, sweep, shrink (evicts)
    assert sorted(again.keys()) == [f"k{i:02d}" for i in range(24, 29)]
    assert again.delete_many(list(again.keys())) == 5
    again.close()
    check(root, disk_owned)


def test_disk_tier_leaves_foreign_files_alone(tmp_path, foreign):
    plant_in, check = foreign
    root = tmp_path / "tier"
    plant_in(root)
    bpb = LAYOUT.bytes_per_block
    tier = DiskTier(root, 12 * (bpb + 64))  # 12 framed blocks: fills and evicts
    cache = KVCache(LAYOUT, 8, tiers=[tier])
    prompts = [list(range(i * 100, i * 100 + 9)) for i in range(12)]  # 2 full blocks each
    for i, p in enumerate(prompts):
        cache.allocate(i, p)
        cache.free(i)
    cache.flush()
    assert cache.tier_stats()["tiers"]["disk"]["entries"] == 12
    assert cache.tiers.levels[0].store.stats().evictions > 0  # the tier filled and evicted
    hit = cache.allocate("again", prompts[-2])  # evicted from the pool, found on disk
    assert hit == 8
    cache.free("again")
    cache.close()
    reopened = KVCache(LAYOUT, 8, tiers=[tier])  # reopen: scan and sweep
    assert reopened.allocate("x", prompts[-5]) == 8  # demoted long ago: on disk
    reopened.close()
    check(root, disk_owned)


def test_snapshot_store_leaves_foreign_files_alone(tmp_path, foreign):
    plant_in, check = foreign
    root = tmp_path / "snaps"

    def in_packs(root: Path) -> None:
        packs = root / "packs"  # made by hand here: foreign things in pagedkv's own folder
        packs.mkdir()
        (packs / "notes.tmp").write_bytes(b"foreign in packs")
        (packs / "readme.pack").write_bytes(b"not a pack name pagedkv gives")
        os.mkfifo(packs / f"{'0' * 16}-1-{'0' * 8}.pack")  # a pack name, but a FIFO
        os.symlink(tmp_path / "outside" / "file.txt", packs / f"{'1' * 16}-1-{'1' * 8}.pack")
        os.mkfifo(packs / f".pagedkv-tmp-{host_id()}-{_dead_pid()}-0123456789ab")

    plant_in(root, in_packs)
    pager = SyntheticPager(LAYOUT, 64, fingerprint="fp")
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        pager.allocate(i, list(range(i * 10, i * 10 + 13)))
        pager.fill_random(i, gen)
    with SnapshotStore(root) as store:
        store.save(pager, [0, 1], name="a")
        store.save(pager, [2, 3], name="b")
        store.fork("a", "a2")
        store.delete("a")
        assert store.verify("a2").ok and store.verify("b").ok
        store.delete("b")
        report = store.gc()
        assert report.pages_deleted > 0
        assert sorted(i.name for i in store.list()) == ["a2"]
    with SnapshotStore(root) as store:  # reopen: sweep
        target = SyntheticPager(LAYOUT, 64, fingerprint="fp")
        assert len(store.load(target, "a2")) == 2
        store.delete("a2")
        store.gc()
    check(root, snapshot_owned)
