"""Level: one opened tier — a block store plus what the chain needs around it.

A level moves whole blocks (``uint8 [n, block_bytes]`` host rows) under string
keys, counts what it did, and swallows store failures: an operation on a failing
store returns "missing" and opens a back-off window (:class:`Backoff`), so a
flaky tier costs misses, never exceptions. A level that has a tier below it keeps
its own LRU index so that *it* picks the victims and the chain can spill them
down before they are deleted; the store's own eviction never runs then.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from pagedkv.errors import StoreError
from pagedkv.tiers.health import Backoff

T = TypeVar("T")

BATCH_BYTES = 8 << 20


def _no_pause() -> None:
    pass


class Level:
    """Common part of a memory or framed level; subclasses define ``_load``/``_put``."""

    _load: Callable[[Sequence[str], torch.Tensor], list[bool]]
    _put: Callable[[Sequence[str], torch.Tensor, Callable[[], None]], int]

    def __init__(
        self,
        name: str,
        store: Any,
        block_bytes: int,
        *,
        capacity_blocks: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.block_bytes = block_bytes
        self.capacity_blocks = capacity_blocks
        self.backoff = backoff or Backoff(name)
        self._lru: OrderedDict[str, None] | None = None  # only when spilling (see track)
        self._lock = threading.Lock()
        self.hits = self.puts = self.spilled = self.corrupt = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.store!r})"

    # -- index for spilling -------------------------------------------------------------

    def track(self, prefix: str) -> None:
        """Keep an LRU index of this level's keys (those under ``prefix``) to choose victims.

        Needs ``capacity_blocks``; entries left by earlier runs are indexed as oldest.
        """
        if self.capacity_blocks is None:
            raise ValueError(
                f"tier {self.name} has no capacity, so it cannot spill to the tier below it; "
                "put it last in the tiers list"
            )
        found = self._guard(lambda: list(self.store.keys(prefix)), [])
        self._lru = OrderedDict.fromkeys(found)

    @property
    def spills(self) -> bool:
        """Whether this level picks its own victims (it has a tier below it)."""
        return self._lru is not None

    @property
    def tracked(self) -> int | None:
        """How many keys the LRU index holds (``None`` without an index)."""
        return None if self._lru is None else len(self._lru)

    def reserve(self, keys: Sequence[str]) -> list[str]:
        """Make room in the index for ``keys`` (as most recent); return the victims to evict.

        ``len(keys)`` must not exceed ``capacity_blocks``. Victims leave the index
        now; the caller spills them, then deletes them from the store.
        """
        lru = self._lru
        assert lru is not None and self.capacity_blocks is not None
        assert len(keys) <= self.capacity_blocks
        with self._lock:
            for k in keys:
                if k in lru:
                    lru.move_to_end(k)
                else:
                    lru[k] = None
            over = len(lru) - self.capacity_blocks
            return [lru.popitem(last=False)[0] for _ in range(max(0, over))]

    def touch(self, keys: Sequence[str]) -> None:
        """Mark ``keys`` as just used (a hit), so they are evicted last."""
        if self._lru is not None:
            with self._lock:
                for k in keys:
                    if k in self._lru:
                        self._lru.move_to_end(k)

    # -- store operations (never raise on store failure) ------------------------------

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Which keys the store holds (``False`` for all while the tier is down)."""
        return self._guard(lambda: self.store.contains_many(keys), [False] * len(keys))

    def load(self, keys: Sequence[str], out: torch.Tensor) -> list[bool]:
        """Copy each key's verified block into ``out[i]`` (host ``uint8 [n, block_bytes]``).

        Returns which rows were filled; rows of misses hold unspecified bytes (a disk
        level reads into them before it verifies).
        """
        found = self._guard(lambda: self._load(keys, out), [False] * len(keys))
        hit = [k for k, f in zip(keys, found) if f]
        self.touch(hit)
        return found

    def put(
        self, keys: Sequence[str], rows: torch.Tensor, *, pause: Callable[[], None] = _no_pause
    ) -> int:
        """Store row ``i`` of ``rows`` under ``keys[i]``; returns how many were stored.

        ``pause()`` is called between batches of a long put (the chain uses it to let
        a prefix lookup go first, and to stop a put that ``close`` gave up on: then it
        raises, and the put stops there).
        """
        n = self._guard(lambda: self._put(keys, rows, pause), 0)
        self.puts += n
        return n

    def delete(self, keys: Sequence[str]) -> int:
        """Delete ``keys`` from the store (and the index); returns how many existed."""
        if self._lru is not None:
            with self._lock:
                for k in keys:
                    self._lru.pop(k, None)
        return self._guard(lambda: self.store.delete_many(keys), 0) if keys else 0

    def stats(self) -> dict[str, Any]:
        """Counters of this level and of its store (no network round trip)."""
        st = self.store.stats()
        return {
            "hits": self.hits,
            "puts": self.puts,
            "spilled": self.spilled,
            "corrupt": self.corrupt,
            "errors": self.backoff.errors,
            "available": not self.backoff.down,
            "entries": st.entries,
            "bytes_used": st.bytes_used,
            "capacity_bytes": st.capacity_bytes,
        }

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    def _guard(self, fn: Callable[[], T], missing: T) -> T:
        if not self.backoff.ready():
            return missing
        try:
            result = fn()
        except (StoreError, OSError) as e:
            self.backoff.failure(e)
            return missing
        self.backoff.success()
        return result


def _run_now(fn: Callable[[Any], T], a: Any) -> Callable[[], T]:
    """``fn(a)`` run at once, as a result getter (raising what ``fn`` raised)."""
    try:
        value = fn(a)
    except Exception as e:
        error = e

        def fail() -> T:
            raise error

        return fail
    return lambda: value


class MemoryLevel(Level):
    """Host slab (:class:`~pagedkv.stores.MemoryStore`): rows move by tensor copies.

    Not framed: the bytes never leave this process, and a digest per block would
    cost more than the copy itself.
    """

    def _load(self, keys: Sequence[str], out: torch.Tensor) -> list[bool]:
        return self.store.get_into(keys, out)

    def _put(self, keys: Sequence[str], rows: torch.Tensor, pause: Callable[[], None]) -> int:
        return self.store.put_tensor_rows(keys, rows)


class FramedLevel(Level):
    """Disk or Redis: each block is framed (fingerprint, length, digest) and verified.

    A value that does not verify (corrupt, truncated, another fingerprint, another
    block size) is a miss, is counted in ``corrupt`` and is deleted. Puts (frame, then
    write) and verification run on a few threads: the digest (XXH3) and the file or
    socket I/O release the GIL, and one file or round trip per block leaves a core
    idle between system calls when done from one thread.
    """

    def __init__(
        self,
        name: str,
        store: Any,
        block_bytes: int,
        fingerprint: str,
        *,
        capacity_blocks: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(name, store, block_bytes, capacity_blocks=capacity_blocks, backoff=backoff)
        self.fingerprint = fingerprint
        self._threads = min(8, max(2, os.cpu_count() or 1))
        self._executor: ThreadPoolExecutor | None = None
        # Framed values are built in reused buffers: a fresh multi-MiB ``bytes`` per block
        # costs its page faults (~1 ms per 2 MiB here, more than digest and copy together).
        # One batch per framing thread is in flight at most.
        self._spare: list[bytearray] = []
        self._max_spare = self._threads * max(1, BATCH_BYTES // block_bytes)

    def _spawn(self, fn: Callable[[Any], T], args: Iterable[Any]) -> list[Callable[[], T]]:
        """Start ``fn(a)`` for each of ``args`` on the framing threads; return result getters.

        Once the interpreter is exiting, executors refuse work: ``fn`` then runs here, so
        the write-backs an unclosed cache still stores at exit are not lost.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="pagedkv-frame")
        getters = []
        for a in args:
            try:
                getters.append(self._executor.submit(fn, a).result)
            except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
                getters.append(_run_now(fn, a))
        return getters

    def _batches(self, n: int) -> list[range]:
        # Round trips of ~BATCH_BYTES: I/O of one batch overlaps the framing of another.
        step = max(1, BATCH_BYTES // self.block_bytes)
        return [range(a, min(n, a + step)) for a in range(0, n, step)]

    def _load(self, keys: Sequence[str], out: torch.Tensor) -> list[bool]:
        from pagedkv.stores import DiskStore

        if isinstance(self.store, DiskStore):
            return self._load_in_place(keys, out)
        from pagedkv.stores.framing import unpack

        rows = out.numpy()
        blobs: list[bytes | None] = [None] * len(keys)

        def verify(i: int) -> bool:
            payload = unpack(blobs[i], fingerprint=self.fingerprint)
            if payload is None or len(payload) != self.block_bytes:
                return False
            rows[i] = np.frombuffer(payload, dtype=np.uint8)
            return True

        results: list[Callable[[], bool]] = []
        try:
            for batch in self._batches(len(keys)):
                for i, blob in zip(batch, self.store.get_many([keys[i] for i in batch])):
                    blobs[i] = blob
                results += self._spawn(verify, batch)
        finally:  # never leave a thread writing into ``out`` after returning
            found = [result() for result in results]
        bad = [k for k, ok, blob in zip(keys, found, blobs) if not ok and blob is not None]
        if bad:
            self.corrupt += len(bad)
            self.delete(bad)
        return found

    def _load_in_place(self, keys: Sequence[str], out: torch.Tensor) -> list[bool]:
        """Disk: each file is read straight into its row, its header apart (no ``bytes``
        per block, no copy); then verified. A row that fails holds unspecified bytes."""
        from pagedkv.stores.framing import HEADER_BYTES, verify

        rows = out.numpy()
        heads = np.empty((len(keys), HEADER_BYTES), dtype=np.uint8)
        read = [False] * len(keys)

        def check(i: int) -> bool:
            return verify(heads[i], rows[i], fingerprint=self.fingerprint)

        results: list[Callable[[], bool]] = []
        try:
            for batch in self._batches(len(keys)):
                sl = slice(batch.start, batch.stop)
                got = self.store.get_into(keys[sl], rows[sl], head=heads[sl])
                read[sl] = got
                results += self._spawn(check, [i for i, ok in zip(batch, got) if ok])
        finally:  # never leave a thread reading ``out`` after returning
            verified = iter([result() for result in results])
        found = [ok and next(verified) for ok in read]
        # not read: missing, or a value of another size (corrupt: delete it)
        unread = [k for k, ok in zip(keys, read) if not ok]
        present = self.store.contains_many(unread) if unread else []
        bad = [k for k, ok, f in zip(keys, read, found) if ok and not f]
        bad += [k for k, p in zip(unread, present) if p]
        if bad:
            self.corrupt += len(bad)
            self.delete(bad)
        return found

    def _put(self, keys: Sequence[str], rows: torch.Tensor, pause: Callable[[], None]) -> int:
        arr = rows.numpy()

        def put_batch(batch: range) -> int:
            values = [self._frame(arr[i]) for i in batch]
            try:
                return self.store.put_many([(keys[i], v) for i, v in zip(batch, values)])
            finally:  # the store has written (or dropped) them: the buffers are free again
                with self._lock:
                    self._spare.extend(values[: self._max_spare - len(self._spare)])

        # Batches are framed and written on the framing threads, ``threads`` at a time:
        # a put of one file per block leaves a core idle between syscalls, and two
        # writers reach ~1.8x one here. ``pause`` runs before each batch starts.
        running: list[Callable[[], int]] = []
        stored = 0
        try:
            for batch in self._batches(len(keys)):
                if len(running) >= self._threads:
                    stored += running.pop(0)()
                pause()
                running += self._spawn(put_batch, [batch])
            while running:
                stored += running.pop(0)()
        finally:  # after an error, still never return while a thread writes
            for result in running:
                with contextlib.suppress(Exception):
                    result()
        return stored

    def _frame(self, row: np.ndarray) -> bytearray:
        """``row`` framed into a spare buffer (a new one if none fits)."""
        from pagedkv.stores.framing import HEADER_BYTES, pack_into

        size = HEADER_BYTES + row.nbytes
        with self._lock:
            buf = self._spare.pop() if self._spare else None
        if buf is None or len(buf) != size:
            buf = bytearray(size)
        pack_into(buf, row, fingerprint=self.fingerprint)
        return buf

    def close(self) -> None:
        """Close the store and stop the framing threads."""
        if self._executor is not None:
            self._executor.shutdown()
        super().close()
