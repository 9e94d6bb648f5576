"""Named results of the block manager: its counters and the :class:`CacheStats` snapshot."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pagedkv.manager.pressure import MemoryPressure
from pagedkv.manager.sequence import SeqRecord

__all__ = ["CacheStats", "Counters", "MemoryPressure", "unused_slots"]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the block manager's counters.

    ``hit_rate`` = hit_tokens / query_tokens (prompt tokens served from the prefix
    cache); ``utilization`` = used_blocks / num_blocks; ``fragmentation`` = unused
    slots in used blocks / slots in used blocks. ``invalidated_blocks``: blocks (cached
    or in use) holding KV of an earlier model fingerprint, never matched again and
    reclaimed by eviction as any cached block is.
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
    invalidated_blocks: int = 0


class Counters:
    """Running totals since the manager was built (bumped once per operation)."""

    __slots__ = ("query_tokens", "hit_tokens", "evictions", "cow_copies", "blocks_allocated")

    def __init__(self) -> None:
        self.query_tokens = 0  # prompt tokens allocated
        self.hit_tokens = 0  # of which found in the prefix cache
        self.evictions = 0  # cached blocks reclaimed (evicted or expired)
        self.cow_copies = 0
        self.blocks_allocated = 0  # blocks handed out


def unused_slots(seqs: Iterable[SeqRecord], block_size: int) -> int:
    """Token slots left empty in the partly filled last blocks (shared ones once)."""
    partial: dict[int, int] = {}
    for seq in seqs:
        fill = len(seq.tokens) % block_size
        if fill:
            partial[seq.blocks[-1]] = fill
    return sum(block_size - fill for fill in partial.values())
