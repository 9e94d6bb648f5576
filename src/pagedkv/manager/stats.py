"""Named results of the block manager: its counters and the :class:`CacheStats` snapshot."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pagedkv.manager.pressure import MemoryPressure
from pagedkv.manager.sequence import SeqRecord

__all__ = ["CacheStats", "Counters", "MemoryPressure", "SeqStats", "unused_slots"]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the block manager's counters.

    ``hit_rate`` = hit_tokens / query_tokens (prompt tokens served from the prefix
    cache); ``utilization`` = used_blocks / num_blocks; ``fragmentation`` = unused
    slots in used blocks / slots in used blocks. ``invalidated_blocks``: blocks (cached
    or in use) holding KV of an earlier model fingerprint, never matched again and
    reclaimed by eviction as any cached block is.

    Counters of calls since the manager was built: ``allocation_failures`` (the
    :class:`~pagedkv.errors.OutOfBlocks` raised by ``allocate``, ``append`` and
    ``share_prefix``), ``deallocations`` (``free`` and ``discard``),
    ``requests_with_hit`` / ``requests_without_hit`` (``allocate`` calls that reused at
    least one cached block / none; a private prompt counts as without). They count
    manager calls: a KVCache swap-out frees and its swap-in allocates again, and an
    engine request re-admitted after preemption is allocated again.
    ``cow_copies`` counts every block copy owed to storage (copy-on-write in
    ``append``, the partly shared block of ``share_prefix``).
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
    allocation_failures: int = 0
    deallocations: int = 0
    requests_with_hit: int = 0
    requests_without_hit: int = 0


@dataclass(frozen=True)
class SeqStats:
    """One live sequence's share of the pool (``seq_stats(seq_id)``).

    ``blocks``: blocks it holds (its table's entries but those released outside a
    sliding window); ``shared_blocks``: those another live sequence holds too (a prefix
    hit chain it shares, a fork's or ``share_prefix``'s blocks); ``tokens``: tokens it
    holds; ``bytes``: KV bytes of its blocks (``blocks`` × bytes per block:
    :meth:`KVCache.seq_stats <pagedkv.KVCache.seq_stats>`; ``None`` from the block
    manager, which knows no bytes); ``utilization``: the held blocks' tokens / (blocks ×
    block_size) (1.0 when it holds none); ``last_access``: the manager's clock at the
    last operation that changed its block table — the ``allocate``, ``fork`` or
    ``share_prefix`` that made it, an ``append`` that gave it a block (an append into
    the block it already has is not stamped: a clock read per token would cost ~15 % of
    an append), so it is exact to within one block of tokens.
    """

    blocks: int
    shared_blocks: int
    tokens: int
    bytes: int | None
    utilization: float
    last_access: float


class Counters:
    """Running totals since the manager was built (bumped once per operation)."""

    __slots__ = (
        "query_tokens", "hit_tokens", "evictions", "cow_copies", "blocks_allocated",
        "allocation_failures", "deallocations", "requests_with_hit", "requests_without_hit",
        "forks",
    )  # fmt: skip

    def __init__(self) -> None:
        self.query_tokens = 0  # prompt tokens allocated
        self.hit_tokens = 0  # of which found in the prefix cache
        self.evictions = 0  # cached blocks reclaimed (evicted or expired)
        self.cow_copies = 0
        self.blocks_allocated = 0  # blocks handed out
        self.allocation_failures = 0  # OutOfBlocks raised
        self.deallocations = 0  # free() calls (discard() included)
        self.requests_with_hit = 0  # allocate() calls that reused >= 1 cached block
        self.requests_without_hit = 0
        self.forks = 0  # sequences made by fork() or share_prefix()

    def violations(self, live: int, block_size: int) -> list[str]:
        """What disagrees between the counters and ``live`` sequences (empty: all holds)."""
        problems = []
        negative = [name for name in self.__slots__ if getattr(self, name) < 0]
        if negative:
            problems.append(f"counters {negative} are negative")
        made = self.requests_with_hit + self.requests_without_hit + self.forks
        if made - self.deallocations != live:
            problems.append(
                f"sequences made ({self.requests_with_hit} + {self.requests_without_hit} "
                f"allocated + {self.forks} forked) - deallocations ({self.deallocations}) "
                f"!= live sequences ({live})"
            )
        if self.hit_tokens > self.query_tokens:
            problems.append(f"hit_tokens ({self.hit_tokens}) > query_tokens ({self.query_tokens})")
        least = self.requests_with_hit * block_size
        if self.hit_tokens < least or (self.hit_tokens and not self.requests_with_hit):
            problems.append(
                f"hit_tokens ({self.hit_tokens}) disagree with requests_with_hit "
                f"({self.requests_with_hit}, at least one block of {block_size} tokens each)"
            )
        return problems


def unused_slots(seqs: Iterable[SeqRecord], block_size: int) -> int:
    """Token slots left empty in the partly filled last blocks (shared ones once)."""
    partial: dict[int, int] = {}
    for seq in seqs:
        fill = len(seq.tokens) % block_size
        if fill:
            partial[seq.blocks[-1]] = fill
    return sum(block_size - fill for fill in partial.values())
