"""What the offload tiers report: :class:`TierStats` per tier, :class:`ChainStats` for
the chain. Frozen dataclasses that are also read-only mappings of their fields, so
``stats.tiers["cpu"].hits`` and ``stats["tiers"]["cpu"]["hits"]`` (the dict form
these stats had before, and the form ``KVCache.tier_stats()`` merges) both work, as
do ``dict(stats)`` and ``**stats``. Compared with ``==`` they are equal to the dict of
their fields; :meth:`to_dict` gives plain (JSON-ready) dicts all the way down.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, cast


class _FieldMapping(Mapping[str, Any]):
    """Mapping access to a dataclass's fields (read-only)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain dicts, nested stats included (e.g. for ``json.dumps``)."""
        return asdict(cast(Any, self))

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cast(Any, self)))


@dataclass(frozen=True, eq=False)
class TierStats(_FieldMapping):
    """Counters of one tier since the cache opened it.

    ``hits``: blocks promoted from it; ``puts``: blocks stored into it; ``spilled``:
    blocks it passed down to the next tier when full; ``corrupt``: entries that failed
    verification (deleted, counted as misses); ``errors``: failed store operations;
    ``available``: not in a back-off window after a failure. ``entries``, ``bytes_used``
    and ``capacity_bytes`` are its store's (``None`` where the store cannot tell: Redis).
    """

    hits: int
    puts: int
    spilled: int
    corrupt: int
    errors: int
    available: bool
    entries: int | None
    bytes_used: int | None
    capacity_bytes: int | None


@dataclass(frozen=True, eq=False)
class ChainStats(_FieldMapping):
    """Counters of the tier chain (:meth:`pagedkv.tiers.TieredStore.stats`).

    ``tiers``: each tier's :class:`TierStats` by name (``cpu``, ``disk``, ``redis``;
    ``disk2`` ... when a kind repeats). ``lookups``: blocks asked for by prefix lookups;
    ``promoted``: blocks loaded back into the pool; ``pending_hits``: of them, found
    still waiting in the write-back queue; ``demoted``: blocks evicted from the pool and
    queued for the first tier; ``written_through``: blocks written to every tier while
    they stay in the pool. ``swapped_sequences``/``swapped_bytes``/``swap_capacity_bytes``:
    the CPU tier's swap area. ``pending_bytes``: staged write-back bytes not stored
    yet; ``lost_blocks``: demoted blocks that could not be stored (a failed or dropped
    write-back: each is only a later miss). ``kv_dtype`` / ``block_bytes``: the format a
    block is stored in by the tiers (``CPUTier(..., kv_dtype="fp8")``; else the pool's)
    and its bytes. ``persisted``: entries written by
    :meth:`~pagedkv.tiers.TieredStore.persist` (a warm restart's ``close(persist=True)``).
    """

    tiers: dict[str, TierStats]
    lookups: int
    promoted: int
    pending_hits: int
    demoted: int
    written_through: int
    swapped_sequences: int
    swapped_bytes: int
    swap_capacity_bytes: int
    pending_bytes: int
    lost_blocks: int
    kv_dtype: str = ""
    block_bytes: int = 0
    persisted: int = 0
