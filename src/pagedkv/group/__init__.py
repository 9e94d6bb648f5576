"""Several KVCaches of one model on different devices, one namespace of sequence ids:
:class:`KVCacheGroup` places, moves and rebalances sequences between them."""

from pagedkv.group.group import KVCacheGroup
from pagedkv.group.results import DeviceStats, MoveResult

__all__ = ["DeviceStats", "KVCacheGroup", "MoveResult"]
