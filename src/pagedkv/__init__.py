"""pagedkv: the KV cache of LLM inference as a library.

The block manager (pure Python, no torch) is imported eagerly; names that need
torch are loaded on first use so ``from pagedkv import BlockManager`` stays light.
A name whose optional dependency is missing raises an ``ImportError`` naming the extra
to install (``pagedkv.Engine needs transformers: pip install "pagedkv[hf]"``).
"""

from __future__ import annotations

from pagedkv._lazy import lazy_getattr
from pagedkv.errors import (
    CacheIntegrityError,
    CachePausedError,
    OutOfBlocks,
    PagedKVError,
    ResourceError,
    SnapshotError,
    StoreError,
    StoreUnavailable,
    UnsupportedModelError,
)
from pagedkv.manager import BlockManager, CacheStats, ManagerConfig, MemoryPressure

__version__ = "0.1.0"  # the one place it is written (pyproject.toml reads it)

# name -> module that defines it; imported lazily (these pull in torch).
_LAZY = {
    "KVLayout": "pagedkv.storage",
    "KVPool": "pagedkv.storage",
    "KVCache": "pagedkv.cache",
    "CompressionStats": "pagedkv.cache",
    "KVCacheGroup": "pagedkv.group",
    "SnapshotStore": "pagedkv.snapshot",
    "SnapshotInfo": "pagedkv.snapshot",
    "CPUTier": "pagedkv.tiers",
    "DiskTier": "pagedkv.tiers",
    "RedisTier": "pagedkv.tiers",
    "Engine": "pagedkv.engine",
    "EngineConfig": "pagedkv.engine",
    "SamplingParams": "pagedkv.engine",
    "RequestOutput": "pagedkv.engine",
    "EngineStats": "pagedkv.engine",
    "PagedCache": "pagedkv.integrations.transformers",
    "PrefixReport": "pagedkv.explain",
    "explain_report": "pagedkv.explain",
}


__getattr__ = lazy_getattr(globals(), _LAZY)


__all__ = [
    "BlockManager",
    "CacheIntegrityError",
    "CachePausedError",
    "CacheStats",
    "ManagerConfig",
    "MemoryPressure",
    "OutOfBlocks",
    "PagedKVError",
    "ResourceError",
    "SnapshotError",
    "StoreError",
    "StoreUnavailable",
    "UnsupportedModelError",
    *_LAZY,
]
