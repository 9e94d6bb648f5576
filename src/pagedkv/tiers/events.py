"""KV events of the tiers: which blocks became findable in a tier, and which stopped.

:meth:`TieredStore.set_event_sink <pagedkv.tiers.chain.TieredStore.set_event_sink>`
gives every level a :class:`TierEvents` while someone subscribes (``KVCache.subscribe``
does it), and takes it away after the last unsubscribes: without one, a level checks
one attribute per store call. What a level reports (``medium``: its name):

- :class:`~pagedkv.events.BlockStored` once a put has landed (``token_ids`` empty and
  ``parent_block_hash`` ``None``: a tier knows blocks by hash only);
- :class:`~pagedkv.events.BlockRemoved` after a delete (the chain spilling a level's
  LRU victims to the level below, or evicting them), after the store evicted blocks
  itself to make room (a last level with a capacity), and for an entry that a
  lookup held but the load did not deliver (corrupt, and deleted).

Only this chain's keys are reported (other caches sharing a store have other
prefixes). Entries a Redis server evicts on its own (``maxmemory``) are not seen; nor
are swap-area entries, which no prompt can find. Events are raised on the writer
thread and handed to the sink, which must be thread-safe
(:meth:`~pagedkv.manager.BlockManager.publish_events`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pagedkv.events import BlockRemoved, BlockStored, KVEvent

EventSink = Callable[[list[KVEvent]], None]


class TierEvents:
    """Reports one level's stored / removed keys to ``sink`` as block-hash events."""

    __slots__ = ("sink", "prefix", "medium", "block_size")

    def __init__(self, sink: EventSink, prefix: str, medium: str, block_size: int) -> None:
        self.sink, self.prefix, self.medium, self.block_size = sink, prefix, medium, block_size

    def stored(self, keys: Sequence[str]) -> None:
        hashes = self._hashes(keys)
        if hashes:
            self.sink([BlockStored(hashes, None, [], self.block_size, self.medium)])

    def removed(self, keys: Sequence[str]) -> None:
        hashes = self._hashes(keys)
        if hashes:
            self.sink([BlockRemoved(hashes, self.medium)])

    def _hashes(self, keys: Sequence[str]) -> list[bytes]:
        prefix, n = self.prefix, len(self.prefix)
        return [bytes.fromhex(k[n:]) for k in keys if k.startswith(prefix)]
