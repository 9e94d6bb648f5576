"""Self-verifying values: a fixed header in front of the payload.

Header (46 bytes, little-endian)::

    magic        4s   b"PKV1"
    version      u16  FORMAT_VERSION (2; version 1 used blake2b-128 for the digest)
    fingerprint  16s  blake2b-128 of the fingerprint string (model, layout, dtype...)
    length       u64  payload length; the blob must be exactly header + length bytes
    digest       16s  XXH3-128 of the payload

Bytes that left the device are checked against all five when they come back; any
mismatch (another version included) is reported as a miss (``None``), never an
exception and never used.

The payload digest guards against corruption (a torn write, a flipped bit, a value
another writer truncated), not against an adversary: anyone who can write the store
can also rewrite the header, keyed or not. XXH3-128 hashes at ~20 GB/s per core
where blake2b runs at ~0.4 GB/s, which on every disk / Redis put and get was the
cost of a block. Snapshot pages are content-addressed by SHA-256 instead
(:mod:`pagedkv.stores.keys`).

:class:`FramedStore` applies the frame over any block store: bytes in and out
(``put_many``/``get_many``) and whole rows (``put_tensor_rows``/``get_into``, the
:class:`~pagedkv.stores.base.RowStore` a disk or Redis tier level drives), framing and
verifying on a few threads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from pagedkv._closing import Closing
from pagedkv._forward import read_through
from pagedkv.stores._rows import tensor_rows
from pagedkv.stores._threads import spawn
from pagedkv.stores.base import (
    BlockStore,
    Buffer,
    EvictsLRU,
    ReadsInto,
    StoreStats,
    check_items,
    check_keys,
)

if TYPE_CHECKING:
    import torch

MAGIC = b"PKV1"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<4sH16sQ16s")
HEADER_BYTES = _HEADER.size
# Rows move in round trips of about this many bytes: the I/O of one batch overlaps the
# framing or verification of another.
BATCH_BYTES = 8 << 20


def _payload_digest(data: Buffer) -> bytes:
    return xxhash.xxh3_128_digest(data)  # releases the GIL: blocks verify in parallel


def fingerprint_digest(fingerprint: str) -> bytes:
    """The 16-byte digest of a fingerprint string, as stored in headers."""
    if not isinstance(fingerprint, str):
        raise TypeError(f"fingerprint must be a str, got {type(fingerprint).__name__}")
    return _fingerprint_digest(fingerprint)


@functools.lru_cache(maxsize=64)
def _fingerprint_digest(fingerprint: str) -> bytes:
    return hashlib.blake2b(fingerprint.encode(), digest_size=16).digest()


def pack(payload: Buffer, *, fingerprint: str) -> bytes:
    """Return header + payload for ``payload`` written under ``fingerprint``."""
    view = memoryview(payload).cast("B")
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, fingerprint_digest(fingerprint), len(view), _payload_digest(view)
    )
    return b"".join((header, view))


def pack_into(buf: bytearray | memoryview, payload: Buffer, *, fingerprint: str) -> None:
    """Write header + payload into ``buf``, which must be exactly ``HEADER_BYTES + len``
    bytes long: :func:`pack` without allocating (a caller can reuse warm buffers)."""
    out = memoryview(buf).cast("B")
    view = memoryview(payload).cast("B")
    if len(out) != HEADER_BYTES + len(view):
        raise ValueError(
            f"pack_into: buffer is {len(out)} bytes, needs HEADER_BYTES + {len(view)} = "
            f"{HEADER_BYTES + len(view)}"
        )
    out[HEADER_BYTES:] = view
    digest = _payload_digest(out[HEADER_BYTES:])  # of the bytes that will be stored
    _HEADER.pack_into(
        out, 0, MAGIC, FORMAT_VERSION, fingerprint_digest(fingerprint), len(view), digest
    )


def unpack(blob: Buffer | None, *, fingerprint: str) -> memoryview | None:
    """Return the payload of ``blob`` (a zero-copy view) or ``None`` if it does not verify.

    ``None`` for: too short, wrong magic or version, other fingerprint, length that
    disagrees with the blob, digest mismatch. Never raises on corrupt data.
    """
    if blob is None:
        return None
    view = memoryview(blob).cast("B")
    if len(view) < HEADER_BYTES:
        return None
    payload = view[HEADER_BYTES:]
    return payload if verify(view[:HEADER_BYTES], payload, fingerprint=fingerprint) else None


def verify(header: Buffer, payload: Buffer, *, fingerprint: str) -> bool:
    """Whether ``header`` (:data:`HEADER_BYTES`) frames exactly ``payload`` under
    ``fingerprint``: :func:`unpack` for a value read in two parts (header, payload)."""
    head = memoryview(header).cast("B")
    view = memoryview(payload).cast("B")
    if len(head) != HEADER_BYTES:
        return False
    magic, version, fp, length, digest = _HEADER.unpack_from(head)
    if magic != MAGIC or version != FORMAT_VERSION or fp != fingerprint_digest(fingerprint):
        return False
    return length == len(view) and _payload_digest(view) == digest


class FramedStore(Closing):
    """A block store wrapper that frames values on put and verifies them on get.

    A value whose header or digest does not match ``fingerprint`` (corrupt, truncated,
    another fingerprint, another block size) is deleted from the underlying store,
    counted in ``stats().corrupt`` (and as a miss) and returned as missing. Each value
    costs :data:`HEADER_BYTES` extra bytes in ``store``.

    Rows (:class:`~pagedkv.stores.base.RowStore`): puts (frame, then write) and
    verification run on ``threads`` threads (default ``min(8, max(2, cpus))``): the
    digest (XXH3) and the file or socket I/O release the GIL, and one file or round
    trip per block leaves a core idle between system calls when done from one thread.
    A store that reads into rows (:class:`~pagedkv.stores.base.ReadsInto`, a DiskStore)
    reads each value straight into its row, the header apart: no ``bytes`` per block.
    """

    def __init__(self, store: BlockStore, fingerprint: str, *, threads: int | None = None) -> None:
        fingerprint_digest(fingerprint)  # type check now, not at the first put
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"FramedStore: threads must be an int >= 1, got {threads!r}")
        self._store = store
        self._fingerprint = fingerprint
        self._threads = threads or min(8, max(2, os.cpu_count() or 1))
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._corrupt = 0  # values that failed verification (deleted)
        self._corrupt_hits = 0  # of them, those the wrapped store counted as hits
        # Framed values are built in reused buffers: a fresh multi-MiB ``bytes`` per block
        # costs its page faults (~1 ms per 2 MiB here, more than digest and copy together).
        # One batch per framing thread is in flight at most.
        self._spare: list[bytearray] = []

    def __repr__(self) -> str:
        return f"FramedStore({self._store!r})"

    inner: BlockStore = read_through("_store", "The wrapped store (values in it carry headers).")

    fingerprint: str = read_through(
        "_fingerprint", "The fingerprint values are written and verified under."
    )

    capacity_bytes: int | None = read_through(
        "_store.capacity_bytes", "The wrapped store's capacity (headers included)."
    )

    # -- bytes (BlockStore) ---------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Frame each value and store it."""
        checked = check_items(items)
        return self._store.put_many(
            [(k, pack(v, fingerprint=self._fingerprint)) for k, v in checked]
        )

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Verified payloads; corrupt values are deleted and returned as ``None``."""
        keys = check_keys(keys)
        blobs = self._store.get_many(keys)
        out: list[bytes | None] = []
        bad: list[str] = []
        for key, blob in zip(keys, blobs):
            payload = unpack(blob, fingerprint=self._fingerprint)
            if payload is None and blob is not None:
                bad.append(key)
            out.append(None if payload is None else bytes(payload))
        self._drop_corrupt(bad, hits=len(bad))
        return out

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Presence in the wrapped store (not verified until read)."""
        return self._store.contains_many(keys)

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete from the wrapped store."""
        return self._store.delete_many(keys)

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys of the wrapped store."""
        return self._store.keys(prefix)

    def stats(self) -> StoreStats:
        """The wrapped store's counters, with corrupt values moved from hits to misses."""
        inner = self._store.stats()
        with self._lock:
            corrupt, hits = self._corrupt, self._corrupt_hits
        return replace(
            inner,
            hits=max(0, inner.hits - hits),
            misses=inner.misses + hits,
            corrupt=inner.corrupt + corrupt,
        )

    def close(self) -> None:
        """Stop the framing threads and close the wrapped store."""
        if self._executor is not None:
            self._executor.shutdown()
        self._store.close()

    # -- rows (RowStore) ------------------------------------------------------------

    def put_tensor_rows(
        self, keys: Sequence[str], rows: torch.Tensor, *, pause: Callable[[], None] | None = None
    ) -> int:
        """Frame row ``i`` of ``rows`` (host ``uint8 [n, w]``) and store it under ``keys[i]``.

        Batches of about :data:`BATCH_BYTES` are framed and written on the framing
        threads, ``threads`` at a time (a put of one file per block leaves a core idle
        between system calls; two writers reach ~1.8x one); ``pause()`` runs before
        each batch starts. Returns how many were stored.
        """
        keys = check_keys(keys)
        arr = tensor_rows(rows, len(keys), "FramedStore.put_tensor_rows", "rows").numpy()
        max_spare = self._threads * max(1, BATCH_BYTES // max(1, arr.shape[1]))

        def put_batch(batch: range) -> int:
            values = [self._frame(arr[i]) for i in batch]
            try:
                return self._store.put_many([(keys[i], v) for i, v in zip(batch, values)])
            finally:  # the store has written (or dropped) them: the buffers are free again
                with self._lock:
                    self._spare.extend(values[: max_spare - len(self._spare)])

        running: list[Callable[[], int]] = []
        stored = 0
        try:
            for batch in _batches(len(keys), arr.shape[1]):
                if len(running) >= self._threads:
                    stored += running.pop(0)()
                if pause is not None:
                    pause()
                running += spawn(self._pool(), put_batch, [batch])
            while running:
                stored += running.pop(0)()
        finally:  # after an error, still never return while a thread writes
            for result in running:
                with contextlib.suppress(Exception):
                    result()
        return stored

    def get_into(self, keys: Sequence[str], out: torch.Tensor) -> list[bool]:
        """Fill ``out[i]`` (host ``uint8 [n, w]``) with the verified payload of ``keys[i]``;
        return which rows were filled. A value that does not verify, or whose payload
        is not ``w`` bytes, is corrupt (deleted, counted); rows of misses hold
        unspecified bytes (a value is read into its row before it is verified)."""
        keys = check_keys(keys)
        rows = tensor_rows(out, len(keys), "FramedStore.get_into", "out").numpy()
        if isinstance(self._store, ReadsInto):
            return self._get_in_place(self._store, keys, rows)
        blobs: list[bytes | None] = [None] * len(keys)

        def check(i: int) -> bool:
            payload = unpack(blobs[i], fingerprint=self._fingerprint)
            if payload is None or len(payload) != rows.shape[1]:
                return False
            rows[i] = np.frombuffer(payload, dtype=np.uint8)
            return True

        results: list[Callable[[], bool]] = []
        try:
            for batch in _batches(len(keys), rows.shape[1]):
                for i, blob in zip(batch, self._store.get_many([keys[i] for i in batch])):
                    blobs[i] = blob
                results += spawn(self._pool(), check, batch)
        finally:  # never leave a thread writing into ``out`` after returning
            found = [result() for result in results]
        bad = [k for k, ok, blob in zip(keys, found, blobs) if not ok and blob is not None]
        self._drop_corrupt(bad, hits=len(bad))
        return found

    def _get_in_place(self, store: ReadsInto, keys: list[str], rows: np.ndarray) -> list[bool]:
        """Each value read straight into its row, its header apart; then verified."""
        heads = np.empty((len(keys), HEADER_BYTES), dtype=np.uint8)
        read = [False] * len(keys)

        def check(i: int) -> bool:
            return verify(heads[i], rows[i], fingerprint=self._fingerprint)

        results: list[Callable[[], bool]] = []
        try:
            for batch in _batches(len(keys), rows.shape[1]):
                sl = slice(batch.start, batch.stop)
                got = store.get_into(keys[sl], rows[sl], head=heads[sl])
                read[sl] = got
                results += spawn(self._pool(), check, [i for i, ok in zip(batch, got) if ok])
        finally:  # never leave a thread reading ``out`` after returning
            verified = iter([result() for result in results])
        found = [ok and next(verified) for ok in read]
        # not read: missing, or a value of another size (corrupt: delete it)
        unread = [k for k, ok in zip(keys, read) if not ok]
        present = self._store.contains_many(unread) if unread else []
        bad = [k for k, ok, f in zip(keys, read, found) if ok and not f]
        hits = len(bad)
        bad += [k for k, p in zip(unread, present) if p]
        self._drop_corrupt(bad, hits=hits)
        return found

    def victims(self, keys: Sequence[str], value_bytes: int) -> list[str]:
        """The entries a put of ``keys`` (payloads of ``value_bytes``) would evict from the
        wrapped store; ``[]`` if it does not evict by itself (Redis)."""
        if isinstance(self._store, EvictsLRU):
            return self._store.victims(keys, value_bytes + HEADER_BYTES)
        return []

    def touch(self, keys: Sequence[str]) -> None:
        """Mark ``keys`` as just used in the wrapped store, where it keeps recency."""
        if isinstance(self._store, EvictsLRU):
            self._store.touch(keys)

    def check_integrity(self) -> None:
        """The wrapped store's ``check_integrity()``, where it has one."""
        check = getattr(self._store, "check_integrity", None)
        if check is not None:
            check()

    # -- internals ------------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self._threads, thread_name_prefix="pagedkv-frame"
                )
            return self._executor

    def _frame(self, row: np.ndarray) -> bytearray:
        """``row`` framed into a spare buffer (a new one if none fits)."""
        size = HEADER_BYTES + row.nbytes
        with self._lock:
            buf = self._spare.pop() if self._spare else None
        if buf is None or len(buf) != size:
            buf = bytearray(size)
        pack_into(buf, row.data, fingerprint=self._fingerprint)
        return buf

    def _drop_corrupt(self, keys: list[str], *, hits: int) -> None:
        """Count and delete values that failed verification (``hits`` of them were read
        whole, so the wrapped store counted them as hits)."""
        if not keys:
            return
        with self._lock:
            self._corrupt += len(keys)
            self._corrupt_hits += hits
        self._store.delete_many(keys)


def _batches(n: int, row_bytes: int) -> list[range]:
    step = max(1, BATCH_BYTES // max(1, row_bytes))
    return [range(a, min(n, a + step)) for a in range(0, n, step)]
