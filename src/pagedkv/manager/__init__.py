"""Paged KV bookkeeping in pure Python: blocks, ref counts, prefix index, eviction.

Nothing here imports torch; the storage layer executes what the manager decides.
One concept per module: ``config`` (options), ``sequence`` (per-sequence record),
``prefix_index``, ``eviction`` (policies, TTL), ``pins``, ``pressure``, ``hashing``,
``stats``, ``integrity`` (the checker), ``block_manager`` (the hot operations) and
``prefix_ops`` (share_prefix, evict, gc).
"""

from pagedkv.manager.block_manager import BlockManager
from pagedkv.manager.config import ManagerConfig
from pagedkv.manager.eviction import POLICIES, EvictionPolicy
from pagedkv.manager.hashing import chain_hashes, namespace
from pagedkv.manager.prefix_index import PromptMatch
from pagedkv.manager.pressure import MemoryPressure
from pagedkv.manager.stats import CacheStats

__all__ = [
    "POLICIES",
    "BlockManager",
    "CacheStats",
    "EvictionPolicy",
    "ManagerConfig",
    "MemoryPressure",
    "PromptMatch",
    "chain_hashes",
    "namespace",
]
