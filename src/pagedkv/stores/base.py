"""The block-store contract shared by offload tiers and snapshots.

A block store maps ``str`` keys to raw bytes. Every operation is batched (one
lock acquisition, one round trip for remote stores) because tiers move hundreds
of blocks at a time. Values are never interpreted: no pickle, no JSON, just bytes.

Protocols (what a caller may rely on; a capability is checked with ``isinstance``):

- :class:`BlockStore`: bytes in, bytes out — every store.
- :class:`ReadsInto`: values read straight into caller rows, a header apart if asked
  (MemoryStore, DiskStore, PackStore) — no ``bytes`` object per value.
- :class:`EvictsLRU`: the store evicts its least recently used entries itself and can
  name them before a put (MemoryStore, DiskStore), so a tier spills them first.
- :class:`RowStore`: whole blocks as rows of a ``uint8`` tensor, what an offload tier
  level drives (MemoryStore, FramedStore).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

# redact_url lives with the location parser; importable from here, where it was first.
from pagedkv.stores.locations import redact_url as redact_url

if TYPE_CHECKING:
    import numpy as np
    import torch

Buffer = bytes | bytearray | memoryview

MAX_KEY_LEN = 200
_KEY_RE = re.compile(r"[0-9A-Za-z._-]{1,200}")
_PREFIX_RE = re.compile(r"[0-9A-Za-z._-]{0,200}")


@dataclass(frozen=True)
class StoreStats:
    """Counters of one store since it was opened.

    ``entries``/``bytes_used`` are ``None`` where the store cannot know them cheaply
    (Redis: the server holds the data). ``bytes_used`` counts value bytes.
    ``hits``/``misses`` count keys asked for by ``get_many`` (and the tensor fast
    path); ``puts`` counts values stored; ``evictions`` entries dropped to make room;
    ``errors`` failed I/O or network operations; ``corrupt`` values that failed
    verification (:class:`~pagedkv.stores.framing.FramedStore`).
    """

    entries: int | None
    bytes_used: int | None
    capacity_bytes: int | None
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    errors: int = 0
    corrupt: int = 0


@dataclass
class Counters:
    """The running counts behind a store's :class:`StoreStats` (updated under its lock)."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    errors: int = 0

    def reads(self, found: int, asked: int) -> None:
        """Count ``asked`` keys read, ``found`` of them hits."""
        self.hits += found
        self.misses += asked - found

    def stats(
        self, entries: int | None, bytes_used: int | None, capacity_bytes: int | None
    ) -> StoreStats:
        """These counts with the store's size, as :class:`StoreStats`."""
        return StoreStats(
            entries, bytes_used, capacity_bytes, self.hits, self.misses, self.puts,
            self.evictions, self.errors,
        )  # fmt: skip


@runtime_checkable
class BlockStore(Protocol):
    """Bytes keyed by ``str`` keys of ``[0-9A-Za-z._-]``, 1-200 characters.

    Implementations are thread-safe within one process (tiers call them from a
    background thread) and evict least-recently-used entries when a put does not
    fit (a ``get`` counts as a use). An invalid key raises ``ValueError``.
    """

    @property
    def capacity_bytes(self) -> int | None:
        """Byte budget of the store, or ``None`` when something else governs it."""
        ...

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Store every ``(key, value)``, replacing existing ones; return how many were stored.

        A value that can never fit raises ``ValueError`` before anything is stored.
        """
        ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return each key's value, or ``None`` for a miss, in the order asked."""
        ...

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Return whether each key is present (does not count as a use)."""
        ...

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the keys; return how many existed."""
        ...

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Iterate the keys that start with ``prefix`` (order unspecified)."""
        ...

    def stats(self) -> StoreStats:
        """Return a snapshot of the counters."""
        ...

    def close(self) -> None:
        """Release resources; the store must not be used afterwards."""
        ...


@runtime_checkable
class ReadsInto(Protocol):
    """Capability: read values straight into rows the caller owns."""

    def get_into(
        self,
        keys: Sequence[str],
        out: torch.Tensor | np.ndarray,
        *,
        head: torch.Tensor | np.ndarray | None = None,
    ) -> list[bool]:
        """Read the value of ``keys[i]`` into ``out[i]`` (``uint8 [n, w]``, host tensor or
        array with contiguous rows); with ``head`` (``uint8 [n, h]``) its first ``h`` bytes
        go to ``head[i]`` and the next ``w`` to ``out[i]``. A key is found (and counts as
        a use) when its value holds exactly ``h + w`` bytes; other rows are left as they
        were. Returns which rows were filled."""
        ...


@runtime_checkable
class EvictsLRU(Protocol):
    """Capability: the store evicts least-recently-used entries when a put does not fit,
    and can say beforehand which ones it would evict."""

    def victims(self, keys: Sequence[str], value_bytes: int) -> list[str]:
        """The keys a put of ``keys`` (values of ``value_bytes`` each) would evict now,
        least recently used first; none of ``keys``. Changes nothing."""
        ...

    def touch(self, keys: Sequence[str]) -> None:
        """Mark the present ``keys`` as just used (evicted last), without reading them."""
        ...


@runtime_checkable
class RowStore(BlockStore, Protocol):
    """A block store that moves whole blocks as rows of a ``uint8 [n, w]`` tensor.

    What an offload tier level drives: :class:`~pagedkv.stores.MemoryStore` (rows copied
    into its slab) and :class:`~pagedkv.stores.FramedStore` (each row framed and
    verified over any block store).
    """

    def put_tensor_rows(
        self, keys: Sequence[str], rows: torch.Tensor, *, pause: Callable[[], None] | None = None
    ) -> int:
        """Store row ``i`` of ``rows`` under ``keys[i]``; return how many were stored.

        ``pause()`` (if given) is called between the batches of a long put; an exception
        it raises stops the put there.
        """
        ...

    def get_into(self, keys: Sequence[str], out: torch.Tensor) -> list[bool]:
        """Fill ``out[i]`` with the block of ``keys[i]``; return which rows were filled.

        Rows of misses hold unspecified bytes (a store may read before it verifies).
        """
        ...

    def victims(self, keys: Sequence[str], value_bytes: int) -> list[str]:
        """As :meth:`EvictsLRU.victims`; ``[]`` where the store does not evict itself."""
        ...

    def touch(self, keys: Sequence[str]) -> None:
        """As :meth:`EvictsLRU.touch`; a no-op where the store keeps no recency."""
        ...

    def check_integrity(self) -> None:
        """Raise :class:`~pagedkv.errors.CacheIntegrityError` if its bookkeeping disagrees."""
        ...


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid store key, else raise ``ValueError`` naming it."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(
            f"invalid block-store key {key!r}: keys are 1-{MAX_KEY_LEN} characters of "
            "[0-9A-Za-z._-] (hex-encode digests, e.g. digest.hex())"
        )
    return key


def check_keys(keys: Iterable[object]) -> list[str]:
    """Validate every key (see :func:`check_key`) and return them as a list."""
    return [check_key(k) for k in keys]


def check_prefix(prefix: object) -> str:
    """Validate a ``keys(prefix)`` argument: like a key, but may be empty."""
    if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
        raise ValueError(
            f"invalid key prefix {prefix!r}: use 0-{MAX_KEY_LEN} characters of [0-9A-Za-z._-]"
        )
    return prefix


def check_items(items: Iterable[tuple[str, Buffer]]) -> list[tuple[str, memoryview]]:
    """Validate ``(key, value)`` pairs; return them with values as flat byte memoryviews."""
    out = []
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise TypeError(f"put_many expects (key, value) pairs, got {item!r:.80}") from None
        check_key(key)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"value of key {key!r} is {type(value).__name__}; stores hold bytes, "
                "bytearray or memoryview (use tensor.numpy().tobytes() or memoryview)"
            )
        view = memoryview(value)
        if not view.c_contiguous:
            raise ValueError(f"value of key {key!r} is not C-contiguous; copy it first")
        out.append((key, view.cast("B") if view.format != "B" or view.ndim != 1 else view))
    return out


def check_capacity(capacity_bytes: object, who: str) -> int:
    """Return ``capacity_bytes`` if it is a positive int, else raise ``ValueError``."""
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise ValueError(f"{who}: capacity_bytes must be a positive int, got {capacity_bytes!r}")
    if capacity_bytes <= 0:
        raise ValueError(
            f"{who}: capacity_bytes must be > 0, got {capacity_bytes} "
            "(give the byte budget, e.g. 4 << 30 for 4 GiB)"
        )
    return capacity_bytes


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
