"""The KV cache's operations on what it keeps: ``share_prefix``, ``evict`` and ``gc``.

:class:`CacheLimits` sits between :class:`~pagedkv._cache_reads.CacheReads` (the
queries) and :class:`~pagedkv.KVCache` (which sets the attributes declared there and
the pause counter below), with the two helpers every changing operation of the cache
calls: the pause check and the demotion of the blocks the manager just evicted.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

from pagedkv._cache_reads import CacheReads, GcStats
from pagedkv.errors import CachePausedError


class CacheLimits(CacheReads):
    """``share_prefix``, ``evict``, ``gc`` of a KV cache (see :class:`~pagedkv.KVCache`)."""

    _paused: int

    def _check_not_paused(self, what: str) -> None:
        if self._paused:
            raise CachePausedError(
                f"{what} is not allowed while the cache is paused (a snapshot is reading it)"
            )

    def share_prefix(self, src_id: Hashable, dst_id: Hashable, num_tokens: int) -> None:
        """Make ``dst_id`` a new sequence holding the first ``num_tokens`` tokens of ``src_id``.

        Full blocks are shared (as by :meth:`fork`); a partly covered last block is
        copied on the pool now (see :meth:`BlockManager.share_prefix`). ``dst_id`` gets
        the source's salt. ``src_id`` must be live (``KeyError``), ``dst_id`` neither
        live nor swapped out (``ValueError``), ``0 < num_tokens <= num_tokens(src_id)``;
        :class:`OutOfBlocks` when the copy finds no block. Nothing changes on error.
        """
        self._check_not_paused("share_prefix()")
        if self._swapped_out(dst_id, "dst_id"):
            raise ValueError(
                f"sequence {dst_id!r} is swapped out; share into a new id "
                "(or free() the swapped-out one first)"
            )
        try:
            self.manager.share_prefix(src_id, dst_id, num_tokens)
        except KeyError:
            raise self._not_live(src_id) from None
        self._flush_evictions()  # before the copy overwrites an evicted block
        copies = self.manager.take_copies()
        if copies:
            self.pool.copy_blocks(copies)
        self._salts[dst_id] = self._salts.get(src_id)

    def evict(self, n: int) -> int:
        """Evict up to ``n`` cached device blocks by the policy; returns how many.

        They are demoted to the tiers (when there are tiers) and become free; see
        :meth:`BlockManager.evict`. Subscribers get the device's removals and the tiers'
        stores as one batch.
        """
        self._check_not_paused("evict()")
        with self.manager.event_batch():  # the device's removals and the tiers' stores
            evicted = self.manager.evict(n)
            self._flush_evictions()
        return evicted

    def gc(self) -> GcStats:
        """A collection pass over the device cache and the tiers; returns what it freed.

        Drops the expired cached blocks (TTL), evicts cached blocks over
        ``max_cached_blocks`` (demoted to the tiers) — both otherwise happen lazily —
        and deletes tier entries over a tier's capacity (only entries other processes
        sharing a disk directory wrote can be; see :meth:`TieredStore.trim`).
        """
        self._check_not_paused("gc()")
        start = time.perf_counter()
        with self.manager.event_batch():  # the device's removals and the tiers' changes
            blocks = self.manager.gc()
            self._flush_evictions()
            entries = self.tiers.trim() if self.tiers is not None else 0
        return GcStats(
            blocks_freed=blocks,
            bytes_freed=blocks * self.layout.bytes_per_block,
            tier_entries_freed=entries,
            seconds=time.perf_counter() - start,
        )

    def _note_eviction(self, block: int, block_hash: bytes) -> None:
        self._evicted.append((block, block_hash))

    def _flush_evictions(self) -> None:
        # Evicted blocks were handed out by the manager call that just returned; the
        # caller has not written them yet, so their old bytes are still intact here.
        if self._evicted:
            evicted, self._evicted = self._evicted, []
            assert self.tiers is not None  # evictions are noted only with tiers
            self.tiers.demote(evicted)
