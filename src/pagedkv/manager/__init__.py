"""Paged KV bookkeeping in pure Python: blocks, ref counts, prefix index, eviction.

Nothing here imports torch; the storage layer executes what the manager decides.
"""

from pagedkv.manager.block_manager import BlockManager
from pagedkv.manager.eviction import POLICIES, EvictionPolicy
from pagedkv.manager.hashing import chain_hashes, namespace
from pagedkv.manager.stats import CacheStats, MemoryPressure

__all__ = [
    "POLICIES",
    "BlockManager",
    "CacheStats",
    "EvictionPolicy",
    "MemoryPressure",
    "chain_hashes",
    "namespace",
]
