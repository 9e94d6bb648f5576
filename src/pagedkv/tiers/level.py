"""Level: one opened tier — a row store plus what the chain needs around it.

A level moves whole blocks (``uint8 [n, bytes_per_block]`` host rows) under string
keys through its :class:`~pagedkv.stores.base.RowStore` (a MemoryStore for the CPU
tier, a FramedStore over a DiskStore or RedisStore for the others), counts what it
did, and swallows store failures: an operation on a failing store returns "missing"
and opens a back-off window (:class:`~pagedkv.tiers.health.Backoff`), so a flaky tier
costs misses, never exceptions. Recency is the store's own (one LRU: the store's);
a level with a tier below it asks the store for its next victims (:meth:`Level.victims`)
so the chain can spill them down before they are deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from pagedkv.errors import StoreError
from pagedkv.stores.base import RowStore
from pagedkv.tiers.events import TierEvents
from pagedkv.tiers.health import Backoff
from pagedkv.tiers.stats import TierStats

T = TypeVar("T")


class Level:
    """One opened tier (see the module docstring).

    ``name``: how stats and logs call it (``cpu``, ``disk``, ``redis``). ``store``: its
    row store. ``capacity_blocks``: how many blocks it holds (``None``: the server
    decides, Redis), needed to spill to a tier below. ``in_process``: its lookups cost
    no I/O (the CPU slab), so the chain may consult it on the eviction path.
    ``events``: where it reports KV events while someone subscribes
    (:mod:`pagedkv.tiers.events`), else ``None``.
    """

    def __init__(
        self,
        name: str,
        store: RowStore,
        bytes_per_block: int,
        *,
        capacity_blocks: int | None = None,
        backoff: Backoff | None = None,
        in_process: bool = False,
    ) -> None:
        self.name = name
        self.store = store
        self.bytes_per_block = bytes_per_block
        self.capacity_blocks = capacity_blocks
        self.backoff = backoff or Backoff(name)
        self.in_process = in_process
        self.hits = self.puts = self.spilled = 0
        self.events: TierEvents | None = None

    def __repr__(self) -> str:
        return f"Level({self.name!r}, {self.store!r})"

    # -- store operations (never raise on store failure) ------------------------------

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Which keys the store holds (``False`` for all while the tier is down)."""
        return self._guard(lambda: self.store.contains_many(keys), [False] * len(keys))

    def load(self, keys: Sequence[str], out: torch.Tensor) -> list[bool]:
        """Copy each key's verified block into ``out[i]`` (host ``uint8 [n, bytes_per_block]``).

        Returns which rows were filled (each a use in the store's LRU); rows of misses
        hold unspecified bytes (a disk level reads into them before it verifies).
        """
        found = self._guard(lambda: self.store.get_into(keys, out), [False] * len(keys))
        ev = self.events  # (a level still down after the call did not reach its store)
        if ev is not None and not self.backoff.down and not all(found):
            ev.removed([k for k, f in zip(keys, found) if not f])  # the chain asks held keys
        return found

    def put(
        self, keys: Sequence[str], rows: torch.Tensor, *, pause: Callable[[], None] | None = None
    ) -> int:
        """Store row ``i`` of ``rows`` under ``keys[i]``; returns how many were stored.

        ``pause()`` is called between batches of a long put (the chain uses it to let
        a prefix lookup go first, and to stop a put that ``close`` gave up on: then it
        raises, and the put stops there).
        """
        ev = self.events
        # the blocks the store will evict for them (a level the chain does not make room in)
        victims = self.victims(keys) if ev is not None and self.capacity_blocks else []
        n = self._guard(lambda: self.store.put_tensor_rows(keys, rows, pause=pause), 0)
        self.puts += n
        if ev is not None and n:
            ev.stored(keys[:n])  # a put stopped early stored the rows before it
            if victims:
                ev.removed([k for k, held in zip(victims, self.contains(victims)) if not held])
        return n

    def delete(self, keys: Sequence[str]) -> int:
        """Delete ``keys`` from the store; returns how many existed."""
        if not keys:
            return 0
        n = self._guard(lambda: self.store.delete_many(keys), 0)
        if self.events is not None and not self.backoff.down:
            self.events.removed(keys)
        return n

    def victims(self, keys: Sequence[str]) -> list[str]:
        """The blocks a put of ``keys`` would make the store evict, least recently used
        first (none while the tier is down). Changes nothing."""
        return self._guard(lambda: self.store.victims(keys, self.bytes_per_block), [])

    def touch(self, keys: Sequence[str]) -> None:
        """Mark ``keys`` as just used (a hit), so they are evicted last."""
        if keys:
            self._guard(lambda: self.store.touch(keys), None)

    def stats(self) -> TierStats:
        """Counters of this level and of its store (no network round trip)."""
        st = self.store.stats()
        return TierStats(
            hits=self.hits,
            puts=self.puts,
            spilled=self.spilled,
            corrupt=st.corrupt,
            errors=self.backoff.errors,
            available=not self.backoff.down,
            entries=st.entries,
            bytes_used=st.bytes_used,
            capacity_bytes=st.capacity_bytes,
        )

    def check_integrity(self) -> None:
        """The store's ``check_integrity()``."""
        self.store.check_integrity()

    def close(self) -> None:
        """Close the store (and its threads)."""
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
