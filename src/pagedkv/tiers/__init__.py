"""Offload tiers below the GPU pool: host memory, local disk, a shared Redis.

Users configure *tiers* with :class:`CPUTier`, :class:`DiskTier` and :class:`RedisTier`
(:mod:`pagedkv.tiers.config`) and pass them to ``KVCache(..., tiers=[...])``. The cache
drives a :class:`TieredStore`, the *chain*: each tier opened as a *level*
(:class:`~pagedkv.tiers.level.Level`, a row store with health and counters), fastest
first. Its counters are :class:`ChainStats` / :class:`TierStats`. The contract is in
``docs/INTERNALS.md``.
"""

from pagedkv.tiers.chain import TieredStore
from pagedkv.tiers.config import CPUTier, DiskTier, RedisTier
from pagedkv.tiers.stats import ChainStats, TierStats

__all__ = ["CPUTier", "ChainStats", "DiskTier", "RedisTier", "TierStats", "TieredStore"]
