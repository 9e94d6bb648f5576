"""Permissions of the files tiers and snapshot stores write (they hold KV bytes and
token ids): the umask by default, ``file_mode=`` exactly when given."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pagedkv import KVCache
from pagedkv.snapshot import SnapshotStore
from pagedkv.storage import KVLayout
from pagedkv.stores import DiskStore, PackStore
from pagedkv.testing import SyntheticPager
from pagedkv.tiers import DiskTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> tuple[set[int], set[int]]:
    """(modes of the files, modes of the folders) under ``root``, ``root`` excluded."""
    files, dirs = set(), set()
    for p in root.rglob("*"):
        (dirs if p.is_dir() else files).add(stat.S_IMODE(p.lstat().st_mode))
    return files, dirs


def fill_disk_store(root: Path, **kw) -> None:
    with DiskStore(root, 1 << 20, **kw) as store:
        store.put_many([(f"key{i}", b"x" * 10) for i in range(5)])
        store.get_many(["key0"])  # a hit re-stamps the file: the mode must stay


@pytest.mark.parametrize(
    ("mask", "file", "folder"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0, 0o666, 0o777)]
)
def test_default_follows_the_umask(tmp_path, mask, file, folder):
    with umask(mask):
        fill_disk_store(tmp_path / "a" / "store")  # the store folder and its parent are new
    assert modes(tmp_path / "a") == ({file}, {folder})


@pytest.mark.parametrize(("mode", "folder"), [(0o600, 0o700), (0o640, 0o750), (0o664, 0o775)])
def test_file_mode_is_applied_exactly_whatever_the_umask(tmp_path, mode, folder):
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    for mask in (0o022, 0o077):
        root = existing / f"store-{mask:o}"
        with umask(mask):
            fill_disk_store(root, file_mode=mode)
        assert modes(root) == ({mode}, {folder})
        assert stat.S_IMODE(root.stat().st_mode) == folder  # created by the store
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755  # existing folders are not chmod-ed


def test_disk_tier_file_mode(tmp_path):
    root = tmp_path / "tier"
    with umask(0o022):
        cache = KVCache(LAYOUT, 4, tiers=[DiskTier(root, 1 << 20, file_mode=0o600)])
        for i in range(6):
            cache.allocate(i, list(range(i * 10, i * 10 + 9)))
            cache.free(i)
        cache.flush()
        assert cache.tier_stats()["tiers"]["disk"]["entries"] > 0
        cache.close()
    assert modes(root) == ({0o600}, {0o700})


def test_snapshot_store_file_mode(tmp_path):
    pager = SyntheticPager(LAYOUT, 16, fingerprint="fp")
    pager.allocate("a", list(range(13)))
    pager.fill_random("a", torch.Generator().manual_seed(0))
    with umask(0o022):
        with SnapshotStore(tmp_path / "private", file_mode=0o600) as store:
            store.save(pager, name="s")
            store.fork("s", "s2")
        with SnapshotStore(tmp_path / "default") as store:
            store.save(pager, name="s")
    assert list((tmp_path / "private" / "packs").glob("*.pack"))
    assert modes(tmp_path / "private") == ({0o600}, {0o700})
    assert modes(tmp_path / "default") == ({0o644}, {0o755})


@pytest.mark.parametrize("bad", [0o1000, -1, True, "600", 0o400, 0o200, 1.5])
def test_bad_file_mode_is_refused(tmp_path, bad):
    for make in (
        lambda: DiskStore(tmp_path / "d", 1 << 20, file_mode=bad),
        lambda: PackStore(tmp_path / "p", file_mode=bad),
        lambda: SnapshotStore(tmp_path / "s", file_mode=bad),
        lambda: DiskTier(tmp_path / "t", 1 << 20, file_mode=bad),
    ):
        error = TypeError if isinstance(bad, (bool, str, float)) else ValueError
        with pytest.raises(error, match="file_mode"):
            make()
    assert not any(tmp_path.iterdir())  # refused before anything was created
