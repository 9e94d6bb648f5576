"""TieredStore's whole-sequence swaps, trimming and introspection (a mixin).

The parts of :class:`~pagedkv.tiers.chain.TieredStore` that do not move blocks between
the pool and the tiers' LRU: ``swap_out`` / ``swap_in`` / ``discard_swap`` (the CPU
tier's swap area), ``trim``, ``stats`` and ``check_integrity``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pagedkv._kv_formats import dtype_name
from pagedkv.errors import StoreError
from pagedkv.storage import KVLayout
from pagedkv.tiers.config import CPUTier, DiskTier, RedisTier
from pagedkv.tiers.level import Level
from pagedkv.tiers.stats import ChainStats
from pagedkv.tiers.swap import SwapArea
from pagedkv.tiers.transfer import Transfer
from pagedkv.tiers.writeback import WriteBack


class ChainUpkeep:
    """Swaps, trim, stats and audit of a chain (``self`` is the TieredStore)."""

    tiers: tuple[CPUTier | DiskTier | RedisTier, ...]
    layout: KVLayout
    tier_layout: KVLayout
    bytes_per_block: int
    key_prefix: str
    levels: list[Level]
    _swap: SwapArea
    _writer: WriteBack
    _xfer: Transfer | None
    _lookups: int
    _promoted: int
    _pending_hits: int
    _demoted: int
    _written_through_blocks: int
    _persisted: int

    if TYPE_CHECKING:  # TieredStore's

        def flush(self) -> None: ...

    def swap_out(self, key: str, block_ids: Sequence[int]) -> None:
        """Copy the blocks of a live sequence to the CPU tier's swap area under ``key``.

        The bytes are never evicted until :meth:`swap_in` or :meth:`discard_swap`.
        Raises ``ValueError`` when the first tier is not a :class:`CPUTier` or ``key``
        is already swapped out, and :class:`OutOfBlocks` when the swap area cannot
        hold the blocks; nothing changes then.
        """
        if not isinstance(self.tiers[0], CPUTier):
            raise ValueError(
                "swap_out needs a CPUTier as the first tier (tiers=[CPUTier(...), ...]); "
                f"the first tier here is {self.levels[0].name}"
            )
        self._swap.check_fits(key, len(block_ids) * self.layout.bytes_per_block)
        self._swap.add(key, *self._transfer.gather(block_ids))

    def swap_in(self, key: str, block_ids: Sequence[int], *, skip: int = 0) -> None:
        """Write the blocks swapped out under ``key`` into ``block_ids`` (pool blocks, as
        many as were swapped out) and release them; the first ``skip`` are left alone (the
        device prefix cache had them). ``KeyError`` for an unknown key, ``ValueError``
        for a wrong count or ``skip``; nothing changes then."""
        ids, rows, event = self._swap.check_swap_in(key, block_ids, skip)
        self._transfer.scatter(ids, rows, after=event)
        self.discard_swap(key)

    def discard_swap(self, key: str) -> bool:
        """Drop the swapped-out blocks of ``key``; returns whether there were any."""
        return self._swap.discard(key)

    def trim(self) -> int:
        """Delete this chain's entries beyond each tier's capacity; returns how many.

        Every put keeps a tier within its capacity, so there is something to delete
        only when other processes share a tier's directory (each process's store knows
        the entries it wrote or read). Pending write-backs are stored first; then each
        tier with a capacity in blocks lists its keys under this chain's prefix (on disk,
        a directory scan) and deletes those past the capacity, in listing order (no
        recency order spans processes). Redis (the server's ``maxmemory``) is skipped,
        and so is a tier that is down.
        """
        self.flush()
        freed = 0
        for level in self.levels:
            cap = level.capacity_blocks
            if cap is None or not level.backoff.ready():
                continue
            try:
                keys = list(level.store.keys(self.key_prefix))
            except (StoreError, OSError):
                continue
            if len(keys) > cap:
                freed += level.delete(keys[cap:])
        return freed

    # -- introspection ------------------------------------------------------------------

    def stats(self) -> ChainStats:
        """Counters of the chain and of each tier (:class:`~pagedkv.tiers.stats.ChainStats`;
        also readable as a mapping: ``stats["tiers"]["cpu"]["hits"]``)."""
        return ChainStats(
            tiers={level.name: level.stats() for level in self.levels},
            lookups=self._lookups,
            promoted=self._promoted,
            pending_hits=self._pending_hits,
            demoted=self._demoted,
            written_through=self._written_through_blocks,
            swapped_sequences=len(self._swap),
            swapped_bytes=self._swap.used_bytes,
            swap_capacity_bytes=self._swap.capacity_bytes,
            pending_bytes=self._writer.pending_bytes,
            lost_blocks=self._writer.lost_blocks,
            kv_dtype=dtype_name(self.tier_layout.kv_dtype),
            block_bytes=self.bytes_per_block,
            persisted=self._persisted,
        )

    def check_integrity(self) -> None:
        """Raise :class:`~pagedkv.errors.CacheIntegrityError` when the swap area, the
        write-back queue or a tier's store disagrees with its own bookkeeping."""
        self._swap.check_integrity()
        self._writer.check_integrity()
        for level in self.levels:
            level.check_integrity()

    @property
    def _transfer(self) -> Transfer:
        if self._xfer is None:
            raise RuntimeError("TieredStore.attach(pool) must be called before moving blocks")
        return self._xfer
