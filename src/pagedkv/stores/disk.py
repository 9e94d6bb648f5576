"""DiskStore: one file per entry under a directory, capped in size, LRU-evicted.

Entries are files ``<root>/<fan>/<key>.v``; what in the directory is the store's, and
nothing else is ever listed, read, replaced, evicted or deleted, is defined in
:mod:`pagedkv.stores.disk_layout`. A write goes to a temp file
``.pagedkv-tmp-<host>-<pid>-<random>`` in the same directory and is renamed over the
entry (:mod:`pagedkv.stores.atomic`); a reader therefore sees the old value, the new
value or nothing, never a partial file, even across processes and after ``kill -9``.

Recency lives in the files' mtimes: every write and every hit stamps the file with a
strictly increasing nanosecond time, and opening a store rebuilds the LRU index
(:class:`~pagedkv.stores._lru.ByteLRU`) by sorting a directory scan by mtime.
Requires a case-sensitive file system (keys ``ab`` and ``AB`` are different files).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NoReturn

import numpy as np

import pagedkv.stores.atomic as atomic
from pagedkv._closing import Closing
from pagedkv._forward import read_through
from pagedkv.errors import StoreError
from pagedkv.stores._files import unlink_quietly
from pagedkv.stores._lru import ByteLRU
from pagedkv.stores._rows import byte_rows
from pagedkv.stores._threads import in_order
from pagedkv.stores.base import (
    Buffer,
    Counters,
    StoreStats,
    check_capacity,
    check_items,
    check_keys,
    check_prefix,
)
from pagedkv.stores.disk_layout import EntryFiles, list_keys, scan

if TYPE_CHECKING:
    import torch

# put_many writes a batch on the writer threads only when its values average at least
# this many bytes: per-file syscalls of small values convoy on the GIL in threads.
_PARALLEL_MIN_VALUE = 128 << 10


class DiskStore(Closing):
    """Block store in a directory, capped at ``capacity_bytes`` of values, LRU-evicted.

    The directory is created if missing; one that cannot be created or written
    raises :class:`StoreError` naming the path and the reason. Leftover temp files
    of dead writers are removed at open (only pagedkv's own temp names: see the
    module docstring for what else is the store's). ``fsync=True`` makes each put durable
    against power loss (fsync of the file and of its directory) at a large cost in
    throughput; the default ``False`` still guarantees that no partial entry is ever
    visible, which is all a cache needs (a lost entry is a miss).

    Several processes may share a directory: each entry is written atomically and a
    read of a key another process wrote finds it. Each process enforces the cap over
    the entries it knows (those present when it opened plus those it wrote or read).
    I/O errors raise :class:`StoreError` (an item of a batch may already be stored).

    ``writers``: threads that write the temp files of one ``put_many`` batch
    concurrently (file creation and writes release the GIL) when its values are
    large (>= 128 KiB on average); entries are still committed one by one, in batch
    order, under the store's lock. The default ``1`` writes on the calling thread.

    ``read_only=True`` reads an existing store (or a missing directory, as an empty
    store) without creating, stamping, evicting or removing anything, so it works on
    a read-only mount; ``put_many``/``delete_many`` then raise :class:`StoreError`.
    ``file_mode``: permission bits of the files (and, with search bits added, of the
    directories) the store creates, applied exactly (e.g. ``0o600``: only this user can
    read the entries, which hold KV bytes and, in a snapshot store, token ids). The
    default ``None`` creates them with ``0o666`` / ``0o777`` minus the process umask.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        fsync: bool = False,
        writers: int = 1,
        read_only: bool = False,
        file_mode: int | None = None,
    ):
        self._read_only = bool(read_only)
        self._lru = ByteLRU(check_capacity(capacity_bytes, "DiskStore"))  # key -> size
        self._root = os.path.abspath(os.fspath(path))
        self._fsync = bool(fsync)
        self._mode = atomic.check_file_mode(file_mode, "DiskStore")
        if isinstance(writers, bool) or not isinstance(writers, int) or writers < 1:
            raise ValueError(f"DiskStore: writers must be an int >= 1, got {writers!r}")
        self._writers = writers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._last_ns = 0
        self._files = EntryFiles(self._root, self._mode, self._fsync)
        self._counts = Counters()
        self._closed = False
        if not self._read_only:
            try:
                atomic.make_dirs(self._root, self._mode)
                fd, probe = atomic.create_temp(self._root, self._mode)
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                raise StoreError(
                    f"DiskStore: cannot use {self._root!r} as a store directory: "
                    f"{e.strerror or e} (pass a writable directory path)"
                ) from e
        self._scan()

    capacity_bytes: int = read_through(
        "_lru.capacity_bytes", "Cap on the total size of the values, in bytes."
    )

    path: str = read_through("_root", "Absolute path of the store directory.")

    file_mode: int | None = read_through(
        "_mode", "Permission bits of the files the store creates (``None``: from the umask)."
    )

    def __repr__(self) -> str:
        return f"DiskStore({self._root!r}, capacity_bytes={self.capacity_bytes})"

    # -- BlockStore ---------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Write each value atomically (evicting LRU entries to stay under the cap).

        The bytes go to a temp file without holding the store's lock (threads write
        in parallel; with ``writers > 1`` a batch of large values is itself written
        on that many threads); only the eviction and the rename are serialized, and
        entries are committed in batch order.
        """
        checked = check_items(items)
        self._check_writable()
        for key, value in checked:
            if len(value) > self.capacity_bytes:
                raise ValueError(
                    f"DiskStore: value of key {key!r} is {len(value)} bytes, larger than "
                    f"capacity_bytes={self.capacity_bytes}"
                )
        self._check_open()
        total = sum(len(v) for _, v in checked)
        if self._writers > 1 and len(checked) > 1 and total >= _PARALLEL_MIN_VALUE * len(checked):
            self._put_parallel(checked)
            return len(checked)
        for key, value in checked:
            self._install(self._write_temp(key, value), key, len(value))
        return len(checked)

    def _install(self, tmp: str, key: str, size: int) -> None:
        """Make room for, and rename the written temp file over, entry ``key``."""
        with self._lock:
            self._make_room(size - (self._lru.size(key) or 0), keep=key)
            self._commit(tmp, key)
            self._lru.add(key, size)
            self._counts.puts += 1

    def _put_parallel(self, checked: list[tuple[str, memoryview]]) -> None:
        """Write temp files on the writer threads (at most ``2 * writers`` ahead of the
        commits), committing each in batch order as soon as it is written. On an error
        the temp files still in flight are removed and the first error is raised."""
        in_order(
            self._writer_pool(),
            2 * self._writers,
            checked,
            produce=lambda item: self._write_temp(*item),
            finish=lambda item, tmp: self._install(tmp, item[0], len(item[1])),
            discard=unlink_quietly,
        )

    def _writer_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._writers, thread_name_prefix="pagedkv-disk")
            return self._pool

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read each value (``None`` for a miss); a hit is stamped most recently used.

        Files are read without holding the store's lock (threads read in parallel).
        """
        keys = check_keys(keys)
        self._check_open()
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self._files.read(key))
            except OSError as e:
                self._read_failed(key, e)
        self._record_reads(keys, [None if v is None else len(v) for v in out])
        return out

    def get_into(
        self,
        keys: Sequence[str],
        out: torch.Tensor | np.ndarray,
        *,
        head: torch.Tensor | np.ndarray | None = None,
    ) -> list[bool]:
        """Read the value of ``keys[i]`` straight into ``out[i]`` (host ``uint8 [n, w]``,
        a tensor or array with contiguous rows), with no intermediate ``bytes``.

        With ``head`` (``uint8 [n, h]``, same kind) each value is read in two parts: its
        first ``h`` bytes into ``head[i]``, the next ``w`` into ``out[i]`` (one ``readv``;
        e.g. a frame header apart from its payload). Returns which rows were filled; a
        key is found when its file holds exactly ``h + w`` bytes (a hit, stamped most
        recently used, as in :meth:`get_many`); any other is a miss and its row is left
        untouched.
        """
        keys = check_keys(keys)
        rows = byte_rows(out, len(keys), "out", "DiskStore.get_into")
        heads = None if head is None else byte_rows(head, len(keys), "head", "DiskStore.get_into")
        self._check_open()
        size_ok = rows.shape[1] + (0 if heads is None else heads.shape[1])
        sizes: list[int | None] = []
        for i, key in enumerate(keys):
            parts = [rows[i]] if heads is None else [heads[i], rows[i]]
            try:
                sizes.append(self._files.read_into(key, [memoryview(p) for p in parts]))
            except OSError as e:
                self._read_failed(key, e)
        found = [size == size_ok for size in sizes]
        self._record_reads(keys, [s if f else None for s, f in zip(sizes, found)])
        return found

    def _read_failed(self, key: str, e: OSError) -> NoReturn:
        with self._lock:
            self._counts.errors += 1
        path = self._files.path(key)
        raise StoreError(f"DiskStore: cannot read {path!r}: {e.strerror or e}") from e

    def _record_reads(self, keys: list[str], sizes: list[int | None]) -> None:
        """Count hits (``sizes[i]`` bytes read) and misses (``None``); stamp the hits."""
        touched = []
        with self._lock:
            lru = self._lru
            for key, size in zip(keys, sizes):
                if size is None:
                    # another thread may have committed it since our read
                    if key in lru and not self._files.is_entry(key):
                        lru.pop(key)
                    self._counts.misses += 1
                    continue
                lru.add(key, size)
                self._counts.hits += 1
                touched.append(key)
            if lru.bytes_used > lru.capacity_bytes and not self._read_only:
                # read entries another process wrote
                self._make_room(0, keep=None)
        self._stamp(touched)

    def _stamp(self, keys: list[str]) -> None:
        """Stamp the entries of ``keys`` most recently used on disk (their mtime), so the
        recency survives a restart. Not in a read-only store."""
        if self._read_only:
            return
        with self._lock:
            stamps = [(self._files.path(k), self._next_ns()) for k in keys]
        self._files.stamp(stamps)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each entry file exists (not a use: recency is unchanged)."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            return [self._files.is_entry(k) for k in keys]

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove the entry files; return how many existed."""
        keys = check_keys(keys)
        self._check_writable()
        with self._lock:
            self._check_open()
            return sum(self._unlink(k) for k in keys)

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys on disk starting with ``prefix`` (a fresh directory scan; temp files never)."""
        return iter(list_keys(self._root, check_prefix(prefix)))

    # -- eviction (EvictsLRU) -------------------------------------------------------

    def victims(self, keys: Sequence[str], value_bytes: int) -> list[str]:
        """The entries a put of ``keys`` (``value_bytes`` each) would evict now to stay
        under the cap, least recently used first. Changes nothing."""
        keys = check_keys(keys)
        incoming = set(keys)
        with self._lock:
            self._check_open()
            need = sum(value_bytes - (self._lru.size(k) or 0) for k in incoming)
            return self._lru.victims(need, keep=incoming)

    def touch(self, keys: Sequence[str]) -> None:
        """Mark the entries of ``keys`` this process knows as just used (evicted last)."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            known = [k for k in keys if self._lru.touch(k)]
        self._stamp(known)

    def stats(self) -> StoreStats:
        """Counters over the entries this process knows."""
        with self._lock:
            return self._counts.stats(len(self._lru), self._lru.bytes_used, self.capacity_bytes)

    def close(self) -> None:
        """Mark the store closed (entries stay on disk for the next open)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def check_integrity(self) -> None:
        """Raise :class:`~pagedkv.errors.CacheIntegrityError` if the size bookkeeping
        disagrees."""
        with self._lock:
            self._lru.check("DiskStore")

    # -- internals ----------------------------------------------------------------

    def _next_ns(self) -> int:
        # Strictly increasing, so the mtime order is the exact use order after a restart.
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return self._last_ns

    def _scan(self) -> None:
        """Rebuild the index from the directory, oldest mtime first; remove dead temps."""
        found = scan(self._root, sweep=not self._read_only)  # a read-only open removes nothing
        for mtime_ns, key, size in found.entries:
            self._lru.add(key, size)
            self._last_ns = max(self._last_ns, mtime_ns)
        self._files.fans |= found.fans
        if not self._read_only:
            self._make_room(0, keep=None)  # the cap may have shrunk since the last open

    def _make_room(self, need: int, keep: str | None) -> None:
        for victim in self._lru.victims(need, keep=() if keep is None else (keep,)):
            self._unlink(victim)
            self._counts.evictions += 1

    def _unlink(self, key: str) -> bool:
        try:
            existed = self._files.unlink(key)
        except OSError:
            existed = True
            self._counts.errors += 1  # the bytes stay on disk, but the cap is about what we track
        self._lru.pop(key)
        return existed

    def _write_temp(self, key: str, value: memoryview) -> str:
        """Write ``value`` to a fresh temp file next to the entry; return its path."""
        try:
            return self._files.write_temp(key, value)
        except OSError as e:
            self._fail_write(None, key, e)

    def _commit(self, tmp: str, key: str) -> None:
        """Stamp the temp file and rename it over the entry (under the lock)."""
        try:
            self._files.commit(tmp, key, self._next_ns(), known=key in self._lru)
        except OSError as e:
            self._fail_write(tmp, key, e)

    def _fail_write(self, tmp: str | None, key: str, e: OSError) -> NoReturn:
        with self._lock:
            self._counts.errors += 1
        if tmp is not None:
            unlink_quietly(tmp)
        raise StoreError(
            f"DiskStore: cannot write key {key!r} under {self._root!r}: {e.strerror or e}"
        ) from e

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("DiskStore is closed")

    def _check_writable(self) -> None:
        if self._read_only:
            raise StoreError(f"DiskStore: {self._root!r} was opened read_only; it takes no writes")
