"""Snapshots under damage: random corruption of pages and manifests, and saves killed mid-way."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from pagedkv.errors import SnapshotError
from pagedkv.snapshot import SnapshotStore
from pagedkv.snapshot.store import MANIFEST_PREFIX, page_key
from pagedkv.storage.layout import KVLayout
from pagedkv.stores.pack_format import PACK_DIR
from pagedkv.testing import SyntheticPager

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype=torch.float16)


def _saved(tmp_path):
    gen = torch.Generator().manual_seed(1)
    src = SyntheticPager(LAYOUT, 32)
    for sid, tokens in [("a", range(14)), ("b", list(range(8)) + [50, 51, 52]), (3, range(90, 95))]:
        src.allocate(sid, list(tokens))
        src.fill_random(sid, gen)
    store = SnapshotStore(tmp_path / "store")
    store.save(src, name="s")
    dst = SyntheticPager(LAYOUT, 16)
    dst.allocate("resident", list(range(9)))
    dst.fill_random("resident", gen)
    return store, dst


def _flip(value: bytes, rng: random.Random) -> bytes:
    out = bytearray(value)
    i = rng.randrange(len(out) * 8)
    out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def test_random_corruption_is_detected_and_refused(tmp_path):
    """Hundreds of trials: flip a bit / truncate / delete a page or the manifest."""
    store, dst = _saved(tmp_path)
    digests = sorted(store.manifest("s").page_digests())
    keys = [page_key(d) for d in digests] + [MANIFEST_PREFIX + "s"]
    pristine = dict(zip(keys, store.backend.get_many(keys)))
    before = dst.state()
    rng = random.Random(1234)
    counts: dict[str, int] = {}
    for _ in range(300):
        key = rng.choice(keys)
        action = rng.choice(["flip", "truncate", "delete"])
        counts[action] = counts.get(action, 0) + 1
        value = pristine[key]
        if action == "flip":
            store.backend.put_many([(key, _flip(value, rng))])
        elif action == "truncate":
            store.backend.put_many([(key, value[: rng.randrange(len(value))])])
        else:
            store.backend.delete_many([key])
        report = store.verify("s")
        assert not report.ok, (key, action)
        if key.endswith(".pg"):
            bad = report.missing if action == "delete" else report.corrupt
            assert bad == [key[:-3]] and report.num_pages == len(digests)
        else:
            assert report.error
        with pytest.raises(SnapshotError):
            store.load(dst, "s")
        _assert_same(dst.state(), before)  # a refused load changes nothing
        store.backend.put_many([(key, value)])
    assert min(counts.values()) > 50
    assert store.verify("s").ok
    store.load(dst, "s")


def _packs(tmp_path) -> list[str]:
    folder = tmp_path / "store" / PACK_DIR
    return sorted(str(folder / n) for n in os.listdir(folder) if n.endswith(".pack"))


def _pack_data_end(path: str) -> int:
    """Offset where a pack's page bytes end (its index starts): from the footer."""
    with open(path, "rb") as f:
        f.seek(-56, os.SEEK_END)
        return int.from_bytes(f.read(56)[16:24], "little")


def test_corruption_of_pack_files_on_disk_is_detected(tmp_path):
    """The same through the files themselves (bit rot under the store's feet)."""
    store, dst = _saved(tmp_path)
    digests = sorted(store.manifest("s").page_digests())
    before = dst.state()
    rng = random.Random(7)
    for trial in range(40):
        path = rng.choice(_packs(tmp_path))
        with open(path, "rb") as f:
            value = f.read()
        end = _pack_data_end(path)
        in_pages = trial % 2 == 0
        bit = rng.randrange(end * 8) if in_pages else rng.randrange(end * 8, len(value) * 8)
        damaged = bytearray(value)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with open(path, "wb") as f:
            f.write(damaged)
        # A fresh handle, as another process would open the store.
        with SnapshotStore(tmp_path / "store") as fresh:
            report = fresh.verify("s")
            assert not report.ok and report.num_pages == len(digests)
            if in_pages:  # one page's bytes: that page is corrupt, the rest verify
                assert len(report.corrupt) == 1 and report.missing == []
            else:  # the pack's index or footer: the pack is skipped, its pages are missing
                assert report.missing and report.corrupt == []
            with pytest.raises(SnapshotError):
                fresh.load(dst, "s")
            _assert_same(dst.state(), before)
        with open(path, "wb") as f:
            f.write(value)
    with SnapshotStore(tmp_path / "store") as fresh:
        assert fresh.verify("s").ok


_KILLED_SAVER = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    import torch
    from pagedkv.snapshot import SnapshotStore
    from pagedkv.testing import SyntheticPager
    from pagedkv.storage.layout import KVLayout

    torch.set_num_threads(1)
    store_dir, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    layout = KVLayout(1, 2, 64, 8, torch.float16)   # 4 KiB pages
    for trial in range(trials):
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the saver: keeps saving new content until killed
            os.close(done_r)
            gen = torch.Generator().manual_seed(seed * 100 + trial)
            pager = SyntheticPager(layout, 128)
            for i in range(4):
                pager.allocate(i, list(range(i * 10_000, i * 10_000 + 8 * 20 - 3)))
            store = SnapshotStore(store_dir, chunk_bytes=6 * 4096)
            n = 0
            while True:
                for i in range(4):
                    pager.fill_random(i, gen)
                store.save(pager, name=f"t{trial}-{n}")
                os.write(done_w, b".")
                n += 1
        os.close(done_w)
        # wait for 1-2 complete saves, then kill at a random point of the next one
        t0 = time.perf_counter()
        k = rng.randint(1, 2)
        got = 0
        while got < k:
            got += len(os.read(done_r, 1))
        per_save = (time.perf_counter() - t0) / k
        time.sleep(rng.uniform(0.0, 1.0) * per_save)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(done_r)
        print(json.dumps({"trial": trial, "saves": k, "save_s": per_save}), flush=True)
    """
)


@pytest.mark.slow
def test_save_killed_at_random_points_leaves_a_consistent_store(tmp_path):
    """SIGKILL saves mid-way: every listed snapshot verifies, and gc reclaims the orphans."""
    store_dir = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVER, str(store_dir), "8", "5"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len([json.loads(line) for line in out.stdout.splitlines()]) == 8

    with SnapshotStore(store_dir) as store:
        infos = store.list()
        assert infos and sorted(store.names()) == sorted(i.name for i in infos)  # none broken
        for info in infos:
            assert store.verify(info.name).ok, info.name
        referenced = set().union(*(store.manifest(i.name).page_digests() for i in infos))
        pages = {k[:-3] for k in store.backend.keys("") if k.endswith(".pg")}
        assert referenced <= pages
        leases = list(store.backend.keys("snap.l."))
        report = store.gc()
        print(f"{len(infos)} snapshots survived, {len(leases)} dead leases, {report}")
        assert report.pages_deleted == len(pages - referenced)
        assert report.leases_removed == len(leases) and report.pages_protected == 0
        assert {k[:-3] for k in store.backend.keys("") if k.endswith(".pg")} == referenced
        assert list(store.backend.keys("snap.l.")) == []
        for info in infos:
            assert store.verify(info.name).ok
        tmp_left = [
            n for _, _, names in os.walk(store_dir) for n in names if n.startswith(".pagedkv-tmp-")
        ]
        assert tmp_left == []  # the store removed the dead writers' temp files when opened


_CONCURRENT_SAVER = textwrap.dedent(
    """
    import sys
    import torch
    from pagedkv.snapshot import SnapshotStore
    from pagedkv.testing import SyntheticPager
    from pagedkv.storage.layout import KVLayout

    torch.set_num_threads(1)
    store_dir, who, saves = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layout = KVLayout(1, 2, 64, 8, torch.float16)   # 4 KiB pages
    gen = torch.Generator().manual_seed(hash(who) % 1000)
    shared = SyntheticPager(layout, 64)  # the same prefix bytes in every save of both writers
    shared.allocate("p", list(range(8 * 10)))
    shared.fill_random("p", torch.Generator().manual_seed(0))
    pager = SyntheticPager(layout, 64)
    pager.allocate("s", list(range(8 * 10)) + list(range(1000, 1000 + 8 * 6 - 3)))
    pager.write_blocks(pager.block_table("s")[:10], shared.read_blocks(shared.block_table("p")))
    with SnapshotStore(store_dir, chunk_bytes=4 * 4096) as store:
        for n in range(saves):
            pager.write_blocks(
                pager.block_table("s")[10:],
                torch.randint(
                    0, 255, (6, layout.bytes_per_block), dtype=torch.uint8, generator=gen
                ),
            )
            store.save(pager, name=f"{who}-{n}")
    print("done", flush=True)
    """
)


@pytest.mark.slow
def test_concurrent_saves_and_gc_keep_every_listed_snapshot_whole(tmp_path):
    """Two processes save (sharing a prefix) while this one deletes snapshots and runs gc."""
    store_dir = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    savers = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_SAVER, str(store_dir), who, "25"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    ]
    gcs = deleted = 0
    with SnapshotStore(store_dir) as store:
        while any(p.poll() is None for p in savers):
            names = store.names()
            for name in names[: max(0, len(names) - 6)]:  # keep the newest few
                store.delete(name)
                deleted += 1
            store.gc()
            gcs += 1
        for p in savers:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0 and out.strip() == "done", err
        store.gc()
        infos = store.list()
        assert len(infos) + deleted == 50 and gcs > 1
        for info in infos:
            assert store.verify(info.name).ok, info.name
        referenced = set().union(*(store.manifest(i.name).page_digests() for i in infos))
        pages = {k[:-3] for k in store.backend.keys("") if k.endswith(".pg")}
        assert pages == referenced  # gc left nothing behind and took nothing needed
