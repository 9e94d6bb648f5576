"""MemoryStore: a fixed slab of host memory cut into equal slots, LRU-evicted.

The slab is one ``uint8`` tensor ``[num_slots, slot_bytes]`` allocated once (pinned
when CUDA is available, so GPU<->CPU copies run asynchronously at full bandwidth).
The index is plain Python: ``key -> slot``, a free-slot stack, and the stores' one
LRU (:class:`~pagedkv.stores._lru.ByteLRU`, ``key -> value length`` in use order).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pagedkv._closing import Closing
from pagedkv.errors import CacheIntegrityError
from pagedkv.stores._lru import ByteLRU
from pagedkv.stores._rows import copy_rows, tensor_rows

if TYPE_CHECKING:
    import torch

from pagedkv.stores.base import (
    Buffer,
    Counters,
    StoreStats,
    check_capacity,
    check_items,
    check_keys,
    check_prefix,
)


class MemoryStore(Closing):
    """In-process block store over one preallocated slab of host memory.

    ``capacity_bytes`` is the slab size; it holds ``capacity_bytes // slot_bytes``
    values of up to ``slot_bytes`` each. ``slot_bytes`` is fixed at construction or
    by the first put (the largest value in it). ``pin``: ``None`` pins when CUDA is
    available, ``False`` never pins. A value larger than a slot raises ``ValueError``.
    (``slot_bytes`` is a slot's size: the tiers' ``bytes_per_block`` when the values
    are unframed KV blocks, as in a CPU tier.)

    ``put_tensor_rows``/``get_into`` are the tiers' fast path (:class:`RowStore`): whole
    blocks move with one indexed torch copy, never through Python ``bytes``.
    """

    def __init__(
        self, capacity_bytes: int, *, slot_bytes: int | None = None, pin: bool | None = None
    ) -> None:
        self._capacity = check_capacity(capacity_bytes, "MemoryStore")
        if slot_bytes is not None:
            if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes <= 0:
                raise ValueError(
                    f"MemoryStore: slot_bytes must be a positive int, got {slot_bytes!r}"
                )
            if slot_bytes > capacity_bytes:
                raise ValueError(
                    f"MemoryStore: slot_bytes={slot_bytes} exceeds capacity_bytes="
                    f"{capacity_bytes}; the store could not hold a single value"
                )
        self._pin = pin
        self._lock = threading.RLock()
        self._slot_of: dict[str, int] = {}
        self._lru = ByteLRU(self._capacity)  # key -> value length, least recent first
        self._free: list[int] = []
        self._slab: Any = None  # torch uint8 [num_slots, slot_bytes]
        self._np: Any = None  # numpy view of the slab for bytes-level access
        self._slot_bytes = 0  # 0 until fixed by the first put
        self._num_slots = 0
        self._counts = Counters()
        self._closed = False
        self._reads_done: Any = None  # CUDA event after the last async get_into
        if slot_bytes is not None:
            self._allocate(slot_bytes)

    # -- properties ---------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        """Size of the slab in bytes (as given)."""
        return self._capacity

    @property
    def slot_bytes(self) -> int | None:
        """Largest value a slot holds; ``None`` until fixed by the first put."""
        return self._slot_bytes or None

    @property
    def num_slots(self) -> int:
        """How many values fit at once (0 until ``slot_bytes`` is known)."""
        return self._num_slots

    @property
    def pinned(self) -> bool:
        """Whether the slab is page-locked (CUDA pinned) memory."""
        return self._slab is not None and bool(self._slab.is_pinned())

    def __repr__(self) -> str:
        return (
            f"MemoryStore(capacity_bytes={self._capacity}, slot_bytes={self._slot_bytes}, "
            f"entries={len(self._slot_of)})"
        )

    # -- BlockStore ---------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Copy each value into a slot (evicting LRU entries as needed); return the count."""
        checked = check_items(items)
        if not checked:
            return 0
        with self._lock:
            self._check_open()
            if not self._slot_bytes:
                largest = max(len(v) for _, v in checked)
                if largest == 0:
                    raise ValueError(
                        "MemoryStore: cannot size slots from empty values; pass slot_bytes="
                    )
                self._allocate(largest)
            for key, value in checked:
                if len(value) > self._slot_bytes:
                    raise ValueError(
                        f"MemoryStore: value of key {key!r} is {len(value)} bytes, larger than "
                        f"a slot ({self._slot_bytes} bytes); create the store with a larger "
                        "slot_bytes"
                    )
            self._wait_reads()
            for key, value in checked:
                slot = self._claim(key)
                n = len(value)
                self._np[slot, :n] = np.frombuffer(value, dtype=np.uint8)
                self._lru.add(key, n)
            self._counts.puts += len(checked)
            return len(checked)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return a copy of each value (``None`` for a miss); a hit becomes most recent."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            out: list[bytes | None] = []
            lru = self._lru
            for key in keys:
                slot = self._slot_of.get(key)
                if slot is None:
                    out.append(None)
                    continue
                lru.touch(key)
                out.append(self._np[slot, : lru.size(key)].tobytes())
            self._counts.reads(sum(v is not None for v in out), len(out))
            return out

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Return whether each key is present (not a use: LRU order is unchanged)."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            return [k in self._slot_of for k in keys]

    def delete_many(self, keys: Sequence[str]) -> int:
        """Free the slots of the keys; return how many existed."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            return sum(self._drop(k) for k in keys if k in self._slot_of)

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, least recently used first (a snapshot list)."""
        prefix = check_prefix(prefix)
        with self._lock:
            return iter([k for k in self._lru if k.startswith(prefix)])

    def stats(self) -> StoreStats:
        """Counters; ``bytes_used`` is the sum of value lengths, not slots taken."""
        with self._lock:
            return self._counts.stats(len(self._slot_of), self._lru.bytes_used, self._capacity)

    def close(self) -> None:
        """Drop the index and release the slab."""
        with self._lock:
            self._closed = True
            self._slot_of.clear()
            self._lru = ByteLRU(self._capacity)
            self._slab = self._np = None

    # -- eviction (EvictsLRU) -------------------------------------------------------

    def victims(self, keys: Sequence[str], value_bytes: int) -> list[str]:
        """The entries a put of ``keys`` would evict now (one slot each for the keys not
        present, beyond the free slots), least recently used first. Changes nothing."""
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            incoming = set(keys)
            new = sum(k not in self._slot_of for k in incoming)
            free = len(self._free) if self._slot_bytes else new
            return self._lru.oldest(new - free, keep=incoming)

    def touch(self, keys: Sequence[str]) -> None:
        """Mark the present ``keys`` as just used (evicted last), without reading them."""
        with self._lock:
            for k in keys:
                self._lru.touch(k)

    # -- tensor fast path (RowStore) ----------------------------------------------

    def put_tensor_rows(
        self, keys: Sequence[str], rows: torch.Tensor, *, pause: Callable[[], None] | None = None
    ) -> int:
        """Store row ``i`` of ``rows`` (``uint8 [n, w]``, ``w <= slot_bytes``) under ``keys[i]``.

        Host rows move with one ``index_copy_`` (over 8-byte words when the width
        allows: byte-wise indexed copies run ~10x below memory bandwidth on CPU).
        CUDA rows are copied straight into the pinned slab, one copy per run of
        consecutive slots (fresh slots come out of the free stack in order), and the
        call returns once they landed. A repeated key keeps its last row. Returns
        how many keys were stored. One batch: ``pause`` is never called.
        """
        keys = check_keys(keys)
        tensor_rows(rows, len(keys), "MemoryStore.put_tensor_rows", "rows")
        if not keys:
            return 0
        with self._lock:
            self._check_open()
            if not self._slot_bytes:
                self._allocate(rows.shape[1])
            width = rows.shape[1]
            if width > self._slot_bytes:
                raise ValueError(
                    f"MemoryStore.put_tensor_rows: rows are {width} bytes wide, larger than "
                    f"a slot ({self._slot_bytes} bytes)"
                )
            self._wait_reads()
            last = {k: i for i, k in enumerate(keys)}  # a repeated key keeps its last row
            src_rows, slots = [], []
            for key, i in last.items():
                slots.append(self._claim(key))
                self._lru.add(key, width)
                src_rows.append(i)
            dst = self._slab if width == self._slot_bytes else self._slab[:, :width]
            copy_rows(dst, slots, rows, src_rows, non_blocking=True)
            if rows.device.type == "cuda":
                import torch

                torch.cuda.current_stream(rows.device).synchronize()
            self._counts.puts += len(slots)
            return len(slots)

    def get_into(
        self,
        keys: Sequence[str],
        out: torch.Tensor,
        *,
        head: torch.Tensor | None = None,
        non_blocking: bool = False,
    ) -> list[bool]:
        """Copy the value of ``keys[i]`` into ``out[i]`` (``uint8 [n, w]``, host or CUDA).

        Returns which rows were filled; a key is found when present with exactly
        ``w`` bytes. Rows of misses are left untouched. Host: one ``index_select``.
        CUDA: one copy per run of consecutive slots from the pinned slab;
        ``non_blocking=True`` returns before they land (the next write to this store
        waits for them, so a slot is never reused under an in-flight copy).
        ``head`` (host ``uint8 [n, h]``): values of ``h + w`` bytes, their first ``h``
        into ``head[i]`` (:class:`ReadsInto`).
        """
        keys = check_keys(keys)
        tensor_rows(out, len(keys), "MemoryStore.get_into", "out")
        width = out.shape[1]
        h = 0
        if head is not None:
            tensor_rows(head, len(keys), "MemoryStore.get_into", "head")
            if out.device.type != "cpu" or head.device.type != "cpu":
                raise ValueError("MemoryStore.get_into: head= takes host tensors only")
            h = head.shape[1]
        with self._lock:
            self._check_open()
            lru = self._lru
            found, rows, slots = [], [], []
            for i, key in enumerate(keys):
                slot = self._slot_of.get(key)
                if slot is None or lru.size(key) != h + width:
                    found.append(False)
                    continue
                found.append(True)
                lru.touch(key)
                rows.append(i)
                slots.append(slot)
            self._counts.reads(len(rows), len(keys))
            if rows and head is not None:
                picked = self._np[slots]  # [n, slot_bytes]: a copy, then split
                head.numpy()[rows] = picked[:, :h]
                out.numpy()[rows] = picked[:, h : h + width]
            elif rows:
                src = self._slab if width == self._slot_bytes else self._slab[:, :width]
                copy_rows(out, rows, src, slots, non_blocking=non_blocking)
                if out.device.type == "cuda" and non_blocking:
                    import torch

                    self._reads_done = torch.cuda.Event()
                    self._reads_done.record(torch.cuda.current_stream(out.device))
            return found

    # -- invariants ---------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` if the slot bookkeeping disagrees."""
        with self._lock:
            used = set(self._slot_of.values())
            free = set(self._free)
            n = self._num_slots
            if len(used) != len(self._slot_of) or len(free) != len(self._free):
                raise CacheIntegrityError(
                    f"MemoryStore: duplicate slots: index {len(self._slot_of)} keys on "
                    f"{len(used)} slots, free stack {len(self._free)} on {len(free)} slots"
                )
            if used & free or used | free != set(range(n)):
                raise CacheIntegrityError(
                    f"MemoryStore: used({len(used)}) + free({len(free)}) != num_slots({n}) "
                    f"or {len(used & free)} slots both used and free"
                )
            if set(self._lru) != self._slot_of.keys():
                odd = sorted(set(self._lru) ^ self._slot_of.keys())
                raise CacheIntegrityError(
                    f"MemoryStore: LRU index ({len(self._lru)} keys) and slot map "
                    f"({len(self._slot_of)} keys) disagree on {odd[:4]}"
                )
            self._lru.check("MemoryStore")
            longer = [k for k in self._lru if (self._lru.size(k) or 0) > self._slot_bytes]
            if longer:
                raise CacheIntegrityError(
                    f"MemoryStore: values of {longer[:4]} are longer than a slot "
                    f"({self._slot_bytes} bytes)"
                )

    # -- internals ----------------------------------------------------------------

    def _allocate(self, slot_bytes: int) -> None:
        import torch

        num_slots = self._capacity // slot_bytes
        if num_slots == 0:
            raise ValueError(
                f"MemoryStore: a {slot_bytes}-byte value does not fit in capacity_bytes="
                f"{self._capacity}"
            )
        pin = self._pin is not False and torch.cuda.is_available()
        self._slab = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, pin_memory=pin)
        self._np = self._slab.numpy()
        self._slot_bytes = slot_bytes
        self._num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def _claim(self, key: str) -> int:
        """The slot for ``key``: its own, a free one, or the LRU victim's."""
        slot = self._slot_of.get(key)
        if slot is not None:
            return slot
        if not self._free:
            victim = next(iter(self._lru))
            self._drop(victim)
            self._counts.evictions += 1
        slot = self._free.pop()
        self._slot_of[key] = slot
        return slot

    def _drop(self, key: str) -> bool:
        self._free.append(self._slot_of.pop(key))
        self._lru.pop(key)
        return True

    def _wait_reads(self) -> None:
        if self._reads_done is not None:
            self._reads_done.synchronize()
            self._reads_done = None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("MemoryStore is closed")
