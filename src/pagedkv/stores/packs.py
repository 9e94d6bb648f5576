"""PackStore: a local snapshot store that writes pages into pack files.

A snapshot save writes its new pages a chunk at a time. Written one file per page,
the cost is the files (create, rename, directory entries), not the bytes: a save
reached about half of a plain sequential write. Here each ``put_many`` of pages
(:func:`~pagedkv.stores.keys.is_page_key`) becomes one pack file (or ``writers`` of
them written side by side), a sequential write like the raw one; every other key
(manifests, leases, and pages of stores written before packs existed) stays a
:class:`~pagedkv.stores.DiskStore` entry. The file format: :mod:`pagedkv.stores.pack_format`.

A pack is written under a temp name (``.pagedkv-tmp-<host>-<pid>-<random>``, removed
by the next open if its writer died: :mod:`pagedkv.stores.atomic`) and renamed when
complete, so a reader sees a whole pack or none, even after ``kill -9``; with
``durable=True`` it is fsynced before the rename. Packs are immutable: deleting pages
rewrites the pack without them (or unlinks it when none is left), and a reader whose
pack vanished rescans the directory and tries again. A pack whose index does not
verify is skipped (its pages read as missing).

Opening a PackStore creates and changes nothing: until the first write it reads the
directory as it is (a missing one is an empty store; a read-only mount works), and
only the first ``put_many``/``delete_many`` that has something to do creates the
directory and removes dead writers' temp files.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

import pagedkv.stores.atomic as atomic
import pagedkv.stores.pack_format as pack_format
from pagedkv._closing import Closing
from pagedkv._forward import read_through
from pagedkv.errors import StoreError
from pagedkv.stores._files import IOV_MAX, pread, pread_runs
from pagedkv.stores._rows import byte_rows
from pagedkv.stores.base import Buffer, Counters, StoreStats, check_items, check_keys, check_prefix
from pagedkv.stores.disk import DiskStore
from pagedkv.stores.keys import is_page_key
from pagedkv.stores.pack_catalog import PackCatalog
from pagedkv.stores.pack_format import PACK_DIR

if TYPE_CHECKING:
    import torch

__all__ = ["PACK_DIR", "PackStore"]

# Split a put_many over several packs written in parallel only from this many bytes per pack.
_MIN_PARALLEL_PACK = 16 << 20
# Snapshots are never evicted: the DiskStore beside the packs gets no effective cap.
_UNBOUNDED = 1 << 62


class PackStore(Closing):
    """Block store for a snapshot directory: page keys (``<sha256 hex>.pg``) in packs.

    ``durable``: fsync each pack before it becomes visible. ``writers``: a large
    ``put_many`` of pages is split over up to this many packs written concurrently
    (at least 16 MiB each). Thread-safe; several processes may share the directory
    (each pack is written once, atomically, by one process). Nothing is created or
    modified before the first write (module docstring). ``file_mode``: permission
    bits of the files and directories it creates, as for
    :class:`~pagedkv.stores.DiskStore` (default: from the umask).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durable: bool = False,
        writers: int = 1,
        file_mode: int | None = None,
    ) -> None:
        if isinstance(writers, bool) or not isinstance(writers, int) or writers < 1:
            raise ValueError(f"PackStore: writers must be an int >= 1, got {writers!r}")
        self._mode = atomic.check_file_mode(file_mode, "PackStore")
        root = os.path.abspath(os.fspath(path))
        if os.path.exists(root) and not os.path.isdir(root):
            raise StoreError(f"PackStore: {root!r} is not a directory")
        try:  # read-only until the first write (_open_for_writing)
            self._disk = DiskStore(root, capacity_bytes=_UNBOUNDED, read_only=True)
        except OSError as e:
            raise StoreError(f"PackStore: cannot read {root!r}: {e.strerror or e}") from e
        self._writable = False
        self._carried = StoreStats(None, None, None)  # counts of the read-only DiskStore
        self._dir = os.path.join(self._disk.path, PACK_DIR)
        self._durable = bool(durable)
        self._writers = writers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._catalog = PackCatalog()  # under self._lock
        self._counts = Counters()  # of the packs (the DiskStore counts its own)
        self.refresh()

    # -- properties --------------------------------------------------------------
    path: str = read_through("_disk.path", "Absolute path of the store directory.")

    @property
    def exists(self) -> bool:
        """Whether the store directory exists (opening one never creates it)."""
        return os.path.isdir(self.path)

    @property
    def capacity_bytes(self) -> None:
        """Snapshot stores have no cap (pages are removed by ``gc`` only)."""
        return None

    def __repr__(self) -> str:
        with self._lock:
            packs, pages = len(self._catalog.packs()), len(self._catalog)
        return f"PackStore({self.path!r}, packs={packs}, pages={pages})"

    # -- index -------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up packs other processes wrote and forget those they removed."""
        try:
            names = pack_format.list_packs(self._dir)
        except OSError as e:
            raise StoreError(f"PackStore: cannot list {self._dir!r}: {e.strerror or e}") from e
        with self._lock:
            catalog = self._catalog
            for gone in catalog.packs() - names:
                catalog.forget(gone)
            catalog.unreadable &= names
            for name in sorted(names - catalog.packs() - catalog.unreadable):
                try:
                    index = pack_format.read_index(os.path.join(self._dir, name))
                except OSError as e:
                    raise StoreError(
                        f"PackStore: cannot read pack {name!r}: {e.strerror or e}"
                    ) from e
                if index is None:
                    catalog.unreadable.add(name)
                else:
                    catalog.add(name, index)

    def check_integrity(self) -> None:
        """Raise :class:`~pagedkv.errors.CacheIntegrityError` naming the pack and the page
        where the in-memory indexes disagree (:meth:`PackCatalog.check`). Reads no file:
        other processes may change the directory at any time."""
        with self._lock:
            self._catalog.check()

    # -- BlockStore --------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Store every item: pages as new pack(s), everything else as DiskStore files."""
        checked = check_items(items)
        if checked:
            self._open_for_writing()
        pages: dict[str, memoryview] = {}  # the last value of a repeated key wins
        other = []
        for key, view in checked:
            if is_page_key(key):
                pages[key] = view
            else:
                other.append((key, view))
        if other:
            self._disk.put_many(other)
        if pages:
            groups = pack_format.split(list(pages.items()), self._writers, _MIN_PARALLEL_PACK)
            if len(groups) == 1:
                self._write_pack(groups[0])
            else:
                for f in [self._writer_pool().submit(self._write_pack, g) for g in groups]:
                    f.result()
        return len(checked)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Each key's value (``None`` for a miss): from its pack, else a DiskStore entry."""
        keys = check_keys(keys)
        self._know(keys)
        out: list[bytes | None] = [None] * len(keys)
        rest = []
        for i, key in enumerate(keys):
            if is_page_key(key):
                out[i] = self._read_page(key, None)
            if out[i] is None:
                rest.append(i)
        if rest:
            for i, v in zip(rest, self._disk.get_many([keys[i] for i in rest])):
                out[i] = v
        self._count([v is not None for v in out])
        return out

    def get_into(
        self,
        keys: Sequence[str],
        out: torch.Tensor | np.ndarray,
        *,
        head: torch.Tensor | np.ndarray | None = None,
    ) -> list[bool]:
        """Read each value straight into row ``i`` of ``out`` (host ``uint8 [n, w]``).

        A key is found when its value holds exactly ``w`` bytes; other rows are left
        as they were. ``head`` is not supported (snapshot pages have no frame header):
        ``TypeError``.
        """
        if head is not None:
            raise TypeError("PackStore.get_into does not take head= (pages are unframed)")
        keys = check_keys(keys)
        rows = byte_rows(out, len(keys), "out", "PackStore.get_into")
        self._know(keys)
        found = self._read_runs(keys, rows)
        for i, key in enumerate(keys):
            if not found[i] and is_page_key(key):  # its pack was rewritten meanwhile?
                found[i] = self._read_page(key, memoryview(rows[i])) is not None
            if not found[i]:  # not packed (a store from before packs), or not this size
                found[i] = self._disk.get_into([key], rows[i : i + 1])[0]
        self._count(found)
        return found

    def _read_runs(self, keys: list[str], rows: np.ndarray) -> list[bool]:
        """Pages into rows, one ``preadv`` per run of pages stored back to back.

        A restore asks for pages in the order a save wrote them, so a chunk is
        usually one run: one open and one system call instead of one per page.
        """
        width = rows.shape[1]
        with self._lock:
            runs = self._catalog.runs(keys, width, IOV_MAX)
        views = [
            (os.path.join(self._dir, name), off, [memoryview(rows[k]) for k in rng])
            for name, off, rng in runs
        ]
        found = [False] * len(keys)
        for (_, _, rng), got in zip(runs, pread_runs(views)):
            for k in rng[: got // width]:
                found[k] = True
        return found

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored now (rescans the pack directory when unsure)."""
        keys = check_keys(keys)
        with self._lock:  # a gc in another process may have removed packs we index
            packs = {h for k in keys for h in self._catalog.holders(k)}
            for name in packs:
                if not os.path.exists(os.path.join(self._dir, name)):
                    self._catalog.forget(name)
        self._know(keys)
        with self._lock:
            got = [is_page_key(k) and k in self._catalog for k in keys]
        rest = [i for i, g in enumerate(got) if not g]
        if rest:
            for i, g in zip(rest, self._disk.contains_many([keys[i] for i in rest])):
                got[i] = g
        return got

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the keys; packs holding deleted pages are rewritten without them."""
        keys = check_keys(keys)
        if not self._writable:
            if not any(self.contains_many(keys)):
                return 0  # nothing to delete: stay read-only
            self._open_for_writing()
        self.refresh()
        doomed = {k for k in keys if is_page_key(k)}
        deleted = set()
        with self._lock:
            affected: dict[str, set[str]] = {}
            for key in doomed:
                for name in self._catalog.holders(key):
                    affected.setdefault(name, set()).add(key)
            for name, gone in affected.items():
                try:
                    kept = self._kept_pages(name, gone)
                except FileNotFoundError:  # another process rewrote or removed it first
                    self._catalog.forget(name)
                    continue
                if kept:
                    self._write_pack(kept)
                self._unlink(name)
                deleted |= gone
        if deleted:  # a copy from before packs, if any, goes too
            self._disk.delete_many(sorted(deleted))
        others = [k for k in keys if k not in deleted]
        return len(deleted) + (self._disk.delete_many(others) if others else 0)

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``: the packed pages, then the DiskStore entries."""
        prefix = check_prefix(prefix)
        self.refresh()
        with self._lock:
            packed = [k for k in self._catalog.pages() if k.startswith(prefix)]
        seen = set(packed)
        return iter(packed + [k for k in self._disk.keys(prefix) if k not in seen])

    def stats(self) -> StoreStats:
        """Counters of the packs and the DiskStore entries together."""
        self.refresh()
        disk = self._disk.stats()
        with self._lock:
            old = self._carried
            return StoreStats(
                entries=(disk.entries or 0) + len(self._catalog),
                bytes_used=(disk.bytes_used or 0) + self._catalog.page_bytes,
                capacity_bytes=None,
                hits=disk.hits + self._counts.hits + old.hits,
                misses=disk.misses + self._counts.misses + old.misses,
                puts=disk.puts + self._counts.puts,
                errors=disk.errors + old.errors,
            )

    def sync(self) -> None:
        """Make everything written to the directory so far durable (one ``syncfs``)."""
        if self.exists:
            atomic.sync_file_system(self.path)

    def close(self) -> None:
        """Stop the pack writers; the files stay."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._disk.close()

    # -- packs -------------------------------------------------------------------
    def _open_for_writing(self) -> None:
        """Before the first write: create the directories, sweep dead writers' temps.

        The read-only DiskStore is replaced by a writable one (whose open removes the
        temp files of dead writers, packs' included); it is not closed, as a reader
        may still be using it.
        """
        with self._lock:
            if self._writable:
                return
            disk = DiskStore(self.path, capacity_bytes=_UNBOUNDED, file_mode=self._mode)
            pack_format.make_pack_dir(self._dir, self._mode)
            atomic.sweep_temps(self._dir)
            self._carried, self._disk, self._writable = self._disk.stats(), disk, True

    def _writer_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._writers, thread_name_prefix="pagedkv-pack")
            return self._pool

    def _write_pack(self, items: list[tuple[str, Buffer]]) -> None:
        """One pack of ``items`` (page key, bytes): temp file, fsync if durable, rename."""
        pack = pack_format.write(self._dir, items, file_mode=self._mode, fsync=self._durable)
        with self._lock:
            self._catalog.add(pack.name, pack.table)
            self._counts.puts += len(pack.table.entries)

    def _know(self, keys: list[str]) -> None:
        """Rescan the pack directory once if a page key is not indexed (a new pack)."""
        with self._lock:
            unknown = any(is_page_key(k) and k not in self._catalog for k in keys)
        if unknown:
            self.refresh()

    def _read_page(self, key: str, into: memoryview | None) -> bytes | None:
        """The page's bytes (into ``into`` when given, if the length matches), or None.

        A pack removed meanwhile (a gc rewrote it) sends us to the directory again once.
        """
        for attempt in range(2):
            with self._lock:
                where = self._catalog.locate(key)
            if where is None:
                return None
            name, off, length = where
            if into is not None and length != len(into):
                return None
            try:
                return pread(os.path.join(self._dir, name), off, length, into)
            except FileNotFoundError:
                if attempt:
                    return None
                self.refresh()
        return None

    def _kept_pages(self, name: str, gone: set[str]) -> list[tuple[str, Buffer]]:
        """The pages of pack ``name`` other than ``gone``, read for its rewrite."""
        path = os.path.join(self._dir, name)
        return pack_format.read_pages(path, self._catalog.index(name), skip=gone)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._dir, name))
        self._catalog.forget(name)

    def _count(self, found: list[bool]) -> None:
        with self._lock:
            self._counts.reads(sum(found), len(found))
