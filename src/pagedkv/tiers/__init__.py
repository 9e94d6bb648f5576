"""Offload tiers below the GPU pool: host memory, local disk, a shared Redis.

Users configure tiers with :class:`CPUTier`, :class:`DiskTier` and :class:`RedisTier`
and pass them to ``KVCache(..., tiers=[...])``; the cache drives a
:class:`TieredStore` (the contract is in ``docs/INTERNALS.md``).
"""

from pagedkv.tiers.chain import TieredStore
from pagedkv.tiers.tier import CPUTier, DiskTier, RedisTier

__all__ = ["CPUTier", "DiskTier", "RedisTier", "TieredStore"]
