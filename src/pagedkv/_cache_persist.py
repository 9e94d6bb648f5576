"""Which device blocks ``KVCache.close(persist=True)`` writes: the manager's cached ones.

The one place that reads the block manager's private tables (its prefix index and ref
counts): :class:`~pagedkv.manager.BlockManager` has no public read of its cached blocks
and their hashes yet. A public ``BlockManager.cached_blocks()`` returning exactly this
should replace it (the manager was being changed by other work when warm restarts were
added, so it was left untouched).
"""

from __future__ import annotations

from pagedkv.manager import BlockManager


def cached_blocks(manager: BlockManager) -> list[tuple[int, bytes]]:
    """``(block id, block hash)`` of every cached block (registered, ref count 0):
    the evictable ones least recently used first, then the pinned ones. Blocks in use
    by live sequences are not included (the KV of their newest slots may not be written
    yet)."""
    hashes, refs = manager._prefix.hashes, manager._ref
    evictable = manager.eviction_order()
    held = set(evictable)
    pinned = [b for b, h in enumerate(hashes) if h and refs[b] == 0 and b not in held]
    return [(b, hashes[b]) for b in [*evictable, *pinned]]
