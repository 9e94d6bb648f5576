"""The KV cache's operations on what it keeps: ``share_prefix``, ``evict``, ``gc``, and the
sliding window's ``release_before`` / ``allocate_released``, and the tier exchange of a
new sequence's prefix (write-through, promotion).

:class:`CacheLimits` sits between :class:`~pagedkv._cache_reads.CacheReads` (the
queries) and :class:`~pagedkv.KVCache` (which sets the attributes declared there and
the pause counter below), with the two helpers every changing operation of the cache
calls: the pause check and the demotion of the blocks the manager just evicted.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from pagedkv._cache_reads import CacheReads, GcStats
from pagedkv.errors import CachePausedError

if TYPE_CHECKING:
    from pagedkv.tiers import TieredStore


class CacheLimits(CacheReads):
    """``share_prefix``, ``evict``, ``gc``, ``release_before``, ``allocate_released`` of a
    KV cache (see :class:`~pagedkv.KVCache`)."""

    _paused: int
    write_through: bool

    def _check_not_paused(self, what: str) -> None:
        if self._paused:
            raise CachePausedError(
                f"{what} is not allowed while the cache is paused (a snapshot is reading it)"
            )

    def append_each(self, seq_ids: Sequence[Hashable], token_ids: Sequence[int]) -> None:
        """One more token for each sequence (a decode step's): ``append(seq_ids[i],
        [token_ids[i]])`` for each ``i`` in order, with one pause check and one flush of
        evictions and copy-on-write copies for all of them.

        Checked first, nothing changed on error: the lengths match, every token id is
        valid and every sequence live (``KeyError``, as append()'s). Out of blocks part
        way raises :class:`OutOfBlocks` with the appends before it done.
        """
        self._check_not_paused("append_each()")
        try:
            self.manager.append_each(seq_ids, token_ids)
        except KeyError:
            manager = self.manager
            raise self._not_live(next(s for s in seq_ids if s not in manager)) from None
        finally:  # what the appends done evicted and copied
            self._flush_evictions()
            copies = self.manager.take_copies()
            if copies:
                self.pool.copy_blocks(copies)

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

    def allocate_released(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        released: int,
        salt: object = None,
        *,
        share_prefix: bool = True,
    ) -> None:
        """Start a sequence whose first ``released`` blocks are already released (a
        windowed sequence moved here): fresh blocks for the rest, no prefix hits; the
        caller writes the KV of every block from ``released`` on. Raises as
        :meth:`allocate` and :meth:`BlockManager.allocate_released` (``share_prefix=False``:
        a private sequence)."""
        self._check_not_paused("allocate_released()")
        if self._swapped_out(seq_id, "seq_id"):
            raise ValueError(f"sequence {seq_id!r} is swapped out; swap_in() it or free() it")
        self.manager.allocate_released(seq_id, token_ids, released, salt, share_prefix=share_prefix)
        try:
            self._flush_evictions()
        except BaseException:
            self.manager.discard(seq_id)
            raise
        self._salts[seq_id] = salt

    def release_before(self, seq_id: Hashable, num_tokens: int) -> int:
        """Release the sequence's whole blocks before token ``num_tokens``; returns how
        many were released now.

        For a model whose every layer is windowed (``window`` tokens): after the KV of
        tokens ``[0, p)`` is written, ``release_before(seq_id, p - window + 1)`` keeps
        only the blocks a later query can read. Released blocks go back to the prefix
        cache (or are freed) as :meth:`free` would leave them; their table entries hold
        a placeholder no windowed kernel reads (see :mod:`pagedkv.manager.window`).
        Raises as :meth:`BlockManager.release_before`; nothing changes on error.
        """
        self._check_not_paused("release_before()")
        try:
            return self.manager.release_before(seq_id, num_tokens)
        except KeyError:
            raise self._not_live(seq_id) from None

    def _allocate_held(
        self, seq_id: Hashable, tokens: Sequence[int], salt: object, released: int, private: bool
    ) -> int:
        """Allocate a sequence to be filled from a copy of its held blocks; returns the
        tokens found cached (none when ``released``: a windowed sequence takes fresh
        blocks for all it holds). The caller flushes evictions and discards on error."""
        if not released:
            return self.manager.allocate(seq_id, tokens, salt, share_prefix=not private)
        self.manager.allocate_released(seq_id, tokens, released, salt, share_prefix=not private)
        return 0

    def _tier_exchange(self, tiers: TieredStore, seq_id: Hashable, cached: int, whole: bool) -> int:
        """Write device hits through (if asked) and load the next blocks from the tiers.

        Returns the tokens loaded; the blocks after the device prefix hit that the tiers
        hold are written into the sequence's fresh blocks.
        """
        bs = self.block_size
        table = self.manager.block_table(seq_id)
        hit = cached // bs
        if self.write_through and hit:
            # A device prefix hit means the block is used at least twice: keep a copy
            # below too (the chain skips blocks it wrote recently).
            hashes = self.manager.block_hashes(seq_id, 0, hit)
            tiers.write_through(list(zip(table[:hit], hashes)))
        n = self.manager.num_tokens(seq_id)
        limit = (n if whole else n - 1) // bs  # (else leave one token to compute)
        if hit >= limit:
            return 0
        hashes = self.manager.block_hashes(seq_id, hit, limit)
        loaded = tiers.promote(hashes, table[hit:limit]) * bs
        self._tier_hit_tokens += loaded
        return loaded

    def _note_eviction(self, block: int, block_hash: bytes) -> None:
        self._evicted.append((block, block_hash))

    def _flush_evictions(self) -> None:
        # Evicted blocks were handed out by the manager call that just returned; the
        # caller has not written them yet, so their old bytes are still intact here.
        if self._evicted:
            evicted, self._evicted = self._evicted, []
            assert self.tiers is not None  # evictions are noted only with tiers
            self.tiers.demote(evicted)
