"""DiskStore: one file per entry under a directory, capped in size, LRU-evicted.

Layout: ``<root>/<fan>/<key>.v`` where ``<fan>`` is the key's first two characters
followed by its last one (dots replaced by ``_`` so no directory is ``.`` or ``..``;
a one-character key ``k`` gives ``kk``). The head keeps ``keys(prefix)`` a scan of
the directories of that prefix; the tail spreads keys that share a long prefix (a
tier's ``kv-<namespace>-<hex hash>``) over 16 directories instead of one, and not
over more: creating a directory costs as much as writing ~0.5 MiB here. A write goes
to a temp file ``.pagedkv-tmp-<host>-<pid>-<random>`` in the same directory and is
renamed over the entry (:mod:`pagedkv.stores.atomic`); a reader therefore sees the
old value, the new value or nothing, never a partial file, even across processes
and after ``kill -9``.

What in the directory is the store's (:mod:`pagedkv.stores.disk_layout`): fan
directories (real directories named by 2-3 characters of ``[0-9A-Za-z_-]``), the
regular files ``<key>.v`` in them whose key fans to that directory (a regular file of
that name is an entry, whoever wrote it), and pagedkv's temp files. Everything else
(other names, symlinks, FIFOs, sockets, folders, also where an entry's name is not a
regular file) is never listed, read, replaced, evicted or deleted; a put over a
non-file of an entry's name raises. Temp
files of earlier versions (``<key>.<pid>.<random>.tmp``) are left alone too: nothing
proves that such a name is pagedkv's.

Recency lives in the files' mtimes: every write and every hit stamps the file
with a strictly increasing nanosecond time, and opening a store rebuilds the LRU
index by sorting a directory scan by mtime. Requires a case-sensitive file
system (keys ``ab`` and ``AB`` are different files).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

from pagedkv.errors import CacheIntegrityError, StoreError
from pagedkv.stores import atomic
from pagedkv.stores.base import (
    Buffer,
    StoreStats,
    byte_rows,
    check_capacity,
    check_items,
    check_keys,
    check_prefix,
)
from pagedkv.stores.disk_layout import (
    SUFFIX,
    fan_head,
    fan_of,
    is_fan,
    is_file,
    key_of,
    open_entry,
    read_exactly,
    scandir,
)

# put_many writes a batch on the writer threads only when its values average at least
# this many bytes: per-file syscalls of small values convoy on the GIL in threads.
_PARALLEL_MIN_VALUE = 128 << 10


class DiskStore:
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
        self._capacity = check_capacity(capacity_bytes, "DiskStore")
        self._root = os.path.abspath(os.fspath(path))
        self._fsync = bool(fsync)
        self._mode = atomic.check_file_mode(file_mode, "DiskStore")
        if isinstance(writers, bool) or not isinstance(writers, int) or writers < 1:
            raise ValueError(f"DiskStore: writers must be an int >= 1, got {writers!r}")
        self._writers = writers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, LRU first
        self._bytes_used = 0
        self._last_ns = 0
        self._dirs: set[str] = set()
        self._hits = self._misses = self._puts = self._evictions = self._errors = 0
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

    @property
    def capacity_bytes(self) -> int:
        """Cap on the total size of the values, in bytes."""
        return self._capacity

    @property
    def path(self) -> str:
        """Absolute path of the store directory."""
        return self._root

    @property
    def file_mode(self) -> int | None:
        """Permission bits of the files the store creates (``None``: from the umask)."""
        return self._mode

    def __repr__(self) -> str:
        return f"DiskStore({self._root!r}, capacity_bytes={self._capacity})"

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
            if len(value) > self._capacity:
                raise ValueError(
                    f"DiskStore: value of key {key!r} is {len(value)} bytes, larger than "
                    f"capacity_bytes={self._capacity}"
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
            self._make_room(size - self._index.get(key, 0), keep=key)
            self._commit(tmp, key)
            self._bytes_used += size - self._index.pop(key, 0)
            self._index[key] = size
            self._puts += 1

    def _put_parallel(self, checked: list[tuple[str, memoryview]]) -> None:
        """Write temp files on the writer threads (at most ``2 * writers`` ahead of the
        commits), committing each in batch order as soon as it is written. On an error
        the temp files still in flight are removed and the first error is raised."""
        pool = self._writer_pool()
        window = 2 * self._writers
        running: deque[tuple[str, int, Future]] = deque()
        try:
            for key, value in checked:
                running.append((key, len(value), pool.submit(self._write_temp, key, value)))
                if len(running) >= window:
                    key0, size0, fut = running.popleft()
                    self._install(fut.result(), key0, size0)
            while running:
                key0, size0, fut = running.popleft()
                self._install(fut.result(), key0, size0)
        except BaseException:
            for _, _, fut in running:
                try:
                    tmp = fut.result()
                except BaseException:  # noqa: S112 - its own writer removed its temp
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise

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
            path = self._path(key)
            try:
                # None: never written, evicted, deleted elsewhere, or not a file
                opened = open_entry(path) if self._fan_ok(key) else None
                if opened is None:
                    out.append(None)
                    continue
                with os.fdopen(opened[0], "rb") as f:
                    out.append(f.read())
            except OSError as e:
                self._read_failed(path, e)
        self._record_reads(keys, [None if v is None else len(v) for v in out])
        return out

    def get_into(self, keys: Sequence[str], out: Any, *, head: Any = None) -> list[bool]:
        """Read the value of ``keys[i]`` straight into ``out[i]`` (host ``uint8 [n, w]``,
        a tensor or array with contiguous rows), with no intermediate ``bytes``.

        With ``head`` (``uint8 [n, h]``, same kind) each value is read in two parts: its
        first ``h`` bytes into ``head[i]``, the next ``w`` into ``out[i]`` (one ``readv``;
        e.g. a frame header apart from its payload). Returns which rows were filled; a
        key is found when its file holds exactly ``h + w`` bytes (a hit, stamped most
        recently used, as in :meth:`get_many`); any other is a miss and its row is left
        untouched. Entries are replaced by rename, never rewritten in place, so the size
        checked before reading is the size read.
        """
        keys = check_keys(keys)
        rows = byte_rows(out, len(keys), "out", "DiskStore.get_into")
        heads = None if head is None else byte_rows(head, len(keys), "head", "DiskStore.get_into")
        self._check_open()
        h = 0 if heads is None else heads.shape[1]
        size_ok = h + rows.shape[1]
        sizes: list[int | None] = []
        for i, key in enumerate(keys):
            path = self._path(key)
            try:
                opened = open_entry(path) if self._fan_ok(key) else None
            except OSError as e:
                self._read_failed(path, e)
            if opened is None:
                sizes.append(None)
                continue
            fd, size = opened
            try:
                if size == size_ok:
                    parts = [rows[i]] if heads is None else [heads[i], rows[i]]
                    read_exactly(fd, [memoryview(p) for p in parts], size)
            except OSError as e:
                self._read_failed(path, e)
            finally:
                os.close(fd)
            sizes.append(size)
        found = [size == size_ok for size in sizes]
        self._record_reads(keys, [s if f else None for s, f in zip(sizes, found)])
        return found

    def _read_failed(self, path: str, e: OSError) -> NoReturn:
        with self._lock:
            self._errors += 1
        raise StoreError(f"DiskStore: cannot read {path!r}: {e.strerror or e}") from e

    def _record_reads(self, keys: list[str], sizes: list[int | None]) -> None:
        """Count hits (``sizes[i]`` bytes read) and misses (``None``); stamp the hits."""
        touched = []
        with self._lock:
            for key, size in zip(keys, sizes):
                if size is None:
                    # another thread may have committed it since our read
                    if key in self._index and not self._is_entry(key):
                        self._forget(key)
                    self._misses += 1
                    continue
                self._bytes_used += size - self._index.pop(key, 0)
                self._index[key] = size
                self._hits += 1
                if not self._read_only:
                    touched.append((self._path(key), self._next_ns()))
            if self._bytes_used > self._capacity and not self._read_only:
                # read entries another process wrote
                self._make_room(0, keep=None)
        for path, stamp in touched:  # recency survives a restart through the mtime
            with contextlib.suppress(OSError):
                os.utime(path, ns=(stamp, stamp), follow_symlinks=False)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each entry file exists (not a use: recency is unchanged)."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            return [self._is_entry(k) for k in keys]

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove the entry files; return how many existed."""
        keys = check_keys(keys)
        self._check_writable()
        with self._lock:
            self._check_open()
            return sum(self._unlink(k) for k in keys)

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys on disk starting with ``prefix`` (a fresh directory scan; temp files never)."""
        prefix = check_prefix(prefix)
        head = prefix[:2].replace(".", "_")
        found = []
        for fan in scandir(self._root):
            if not (
                is_fan(fan.name)
                and fan_head(fan.name).startswith(head)
                and fan.is_dir(follow_symlinks=False)
            ):
                continue
            for entry in scandir(fan.path):
                key = key_of(entry.name, fan.name)
                if key is not None and key.startswith(prefix) and is_file(entry):
                    found.append(key)
        return iter(found)

    def stats(self) -> StoreStats:
        """Counters over the entries this process knows."""
        with self._lock:
            return StoreStats(
                entries=len(self._index),
                bytes_used=self._bytes_used,
                capacity_bytes=self._capacity,
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                evictions=self._evictions,
                errors=self._errors,
            )

    def close(self) -> None:
        """Mark the store closed (entries stay on disk for the next open)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` if the size bookkeeping disagrees."""
        with self._lock:
            total = sum(self._index.values())
            if total != self._bytes_used or total > self._capacity:
                raise CacheIntegrityError(
                    f"DiskStore: bytes_used({self._bytes_used}), sum of entry sizes({total}), "
                    f"capacity_bytes({self._capacity}) disagree"
                )

    # -- internals ----------------------------------------------------------------

    def _path(self, key: str) -> str:
        return os.path.join(self._root, fan_of(key), key + SUFFIX)

    def _fan_ok(self, key: str) -> bool:
        """Whether the key's fan directory is a real directory (a symlink that happens to
        have a fan's name leads outside the store: no entry is read or written there)."""
        fan = fan_of(key)
        if fan in self._dirs:
            return True
        if atomic.is_real_dir(os.path.join(self._root, fan)):
            self._dirs.add(fan)
            return True
        return False

    def _is_entry(self, key: str) -> bool:
        """Whether the entry of ``key`` exists as a regular file."""
        if not self._fan_ok(key):
            return False
        try:
            return stat.S_ISREG(os.lstat(self._path(key)).st_mode)
        except OSError:
            return False

    def _next_ns(self) -> int:
        # Strictly increasing, so the mtime order is the exact use order after a restart.
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return self._last_ns

    def _scan(self) -> None:
        """Rebuild the index from the directory, oldest mtime first; remove dead temps."""
        now = time.time()
        entries = []
        sweep = not self._read_only  # a read-only open removes nothing
        for fan in scandir(self._root):
            if atomic.temp_owner(fan.name) is not None:  # the probe's, or a future root write
                if sweep:
                    atomic.remove_stale_temp(fan, now)
                continue
            if not is_fan(fan.name) or not fan.is_dir(follow_symlinks=False):
                continue
            for entry in scandir(fan.path):
                if atomic.temp_owner(entry.name) is not None:
                    if sweep:
                        atomic.remove_stale_temp(entry, now)
                    continue
                key = key_of(entry.name, fan.name)
                if key is None:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    entries.append((st.st_mtime_ns, key, st.st_size))
            self._dirs.add(fan.name)
        entries.sort()
        for mtime_ns, key, size in entries:
            self._index[key] = size
            self._bytes_used += size
            self._last_ns = max(self._last_ns, mtime_ns)
        if not self._read_only:
            self._make_room(0, keep=None)  # the cap may have shrunk since the last open

    def _make_room(self, need: int, keep: str | None) -> None:
        while self._bytes_used + need > self._capacity and self._index:
            victim = next(iter(self._index))
            if victim == keep:  # the key being replaced: its old size is already in `need`
                self._index.move_to_end(victim)
                if len(self._index) == 1:
                    break
                continue
            self._unlink(victim)
            self._evictions += 1

    def _unlink(self, key: str) -> bool:
        existed = self._is_entry(key)  # a non-file of the entry's name is not ours
        if existed:
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                existed = False
            except OSError:
                self._errors += 1  # the bytes stay on disk, but the cap is about what we track
        self._forget(key)
        return existed

    def _forget(self, key: str) -> None:
        self._bytes_used -= self._index.pop(key, 0)

    def _write_temp(self, key: str, value: memoryview) -> str:
        """Write ``value`` to a fresh temp file next to the entry; return its path."""
        fan = fan_of(key)
        directory = os.path.join(self._root, fan)
        try:
            if fan not in self._dirs:
                atomic.make_dirs(directory, self._mode)
                if not atomic.is_real_dir(directory):
                    raise NotADirectoryError(
                        errno.ENOTDIR,
                        f"{directory!r} is not a directory the store made (a symlink or a "
                        "file of that name is in the way); move it away",
                    )
                self._dirs.add(fan)
            return atomic.write_temp(directory, [value], file_mode=self._mode, fsync=self._fsync)
        except OSError as e:
            self._dirs.discard(fan)
            self._fail_write(None, key, e)

    def _commit(self, tmp: str, key: str) -> None:
        """Stamp the temp file and rename it over the entry (under the lock)."""
        try:
            stamp = self._next_ns()
            os.utime(tmp, ns=(stamp, stamp))
            # an indexed key is a regular file the store found or wrote: no need to look
            known = key in self._index
            atomic.commit(tmp, self._path(key), fsync=self._fsync, check=not known)
        except OSError as e:
            self._fail_write(tmp, key, e)

    def _fail_write(self, tmp: str | None, key: str, e: OSError) -> NoReturn:
        with self._lock:
            self._errors += 1
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise StoreError(
            f"DiskStore: cannot write key {key!r} under {self._root!r}: {e.strerror or e}"
        ) from e

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("DiskStore is closed")

    def _check_writable(self) -> None:
        if self._read_only:
            raise StoreError(f"DiskStore: {self._root!r} was opened read_only; it takes no writes")
