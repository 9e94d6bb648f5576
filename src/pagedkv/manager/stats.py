"""Named results of the block manager: cache statistics and memory-pressure levels."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class MemoryPressure(enum.IntEnum):
    """How full the pool is with blocks in use (cached blocks are reclaimable)."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the block manager's counters.

    ``hit_rate`` = hit_tokens / query_tokens (prompt tokens served from the prefix
    cache); ``utilization`` = used_blocks / num_blocks; ``fragmentation`` = unused
    slots in used blocks / slots in used blocks.
    """

    num_blocks: int
    block_size: int
    used_blocks: int
    cached_blocks: int
    free_blocks: int
    pinned_blocks: int
    num_sequences: int
    query_tokens: int
    hit_tokens: int
    hit_rate: float
    evictions: int
    cow_copies: int
    blocks_allocated: int
    utilization: float
    fragmentation: float
    pressure: MemoryPressure
