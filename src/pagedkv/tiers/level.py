"""Level: one opened tier — a block store plus what the chain needs around it.

A level moves whole blocks (``uint8 [n, block_bytes]`` host rows) under string
keys, counts what it did, and swallows store failures: an operation on a failing
store returns "missing" and opens a back-off window (:class:`Backoff`), so a
flaky tier costs misses, never exceptions. A level that has a tier below it keeps
its own LRU index so that *it* picks the victims and the chain can spill them
down before they are deleted; the store's own eviction never runs then.
"""

from __future__ import annotations

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

        Returns which rows were filled; rows of misses are left untouched.
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
        a prefix lookup go first).
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
    block size) is a miss, is counted in ``corrupt`` and is deleted. Framing and
    verification run on a few threads: the digest, not the I/O, is the cost of a
    block here, and hashlib releases the GIL on large buffers.
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

    def _spawn(self, fn: Callable[[int], T], indices: Iterable[int]) -> list[Callable[[], T]]:
        """Start ``fn(i)`` for each index on the framing threads; return result getters."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="pagedkv-frame")
        return [self._executor.submit(fn, i).result for i in indices]

    def _batches(self, n: int) -> list[range]:
        # Round trips of ~BATCH_BYTES: framing of one batch overlaps the I/O of another.
        step = max(1, BATCH_BYTES // self.block_bytes)
        return [range(a, min(n, a + step)) for a in range(0, n, step)]

    def _load(self, keys: Sequence[str], out: torch.Tensor) -> list[bool]:
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

    def _put(self, keys: Sequence[str], rows: torch.Tensor, pause: Callable[[], None]) -> int:
        from pagedkv.stores.framing import pack

        arr = rows.numpy()
        frame = lambda i: pack(arr[i], fingerprint=self.fingerprint)  # noqa: E731
        batches = self._batches(len(keys))
        stored, ahead = 0, self._spawn(frame, batches[0]) if batches else []
        for j, batch in enumerate(batches):
            framed = ahead
            pause()
            if j + 1 < len(batches):  # frame the next batch while this one is written
                ahead = self._spawn(frame, batches[j + 1])
            stored += self.store.put_many([(keys[i], f()) for i, f in zip(batch, framed)])
        return stored

    def close(self) -> None:
        """Close the store and stop the framing threads."""
        if self._executor is not None:
            self._executor.shutdown()
        super().close()
