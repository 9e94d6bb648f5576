"""Eviction policies over *cached* blocks (ref count 0, hash registered, not pinned).

Every policy keeps its blocks in the order they became cached, with O(1) add and
O(1) (amortized) removal from the middle (a cached block hit by a new prompt leaves
the policy without a scan); the head is the block cached longest ago (what TTL
expiry needs). LRU evicts that head; FIFO and LFU keep a heap of candidates on top.
All three delete lazily: an entry whose block left the policy (or came back later)
is stale and skipped when it surfaces.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from typing import Protocol


class EvictionPolicy(Protocol):
    """Chooses which cached block to evict. All operations O(1) or O(log n)."""

    def add(self, block: int) -> None:
        """``block`` became evictable (its last reference was dropped)."""

    def add_many(self, blocks: list[int]) -> None:
        """``add`` each block in order (one call for a whole released sequence)."""

    def remove(self, block: int) -> None:
        """``block`` is no longer evictable (hit by a prompt, pinned or invalidated)."""

    def pop(self) -> int:
        """Remove and return the block to evict next (the policy is not empty)."""

    def oldest(self) -> int | None:
        """The block that has been cached the longest, or None when empty."""

    def order(self) -> list[int]:
        """Blocks in the order they would be evicted (for tests and debugging)."""

    def __len__(self) -> int: ...

    def __contains__(self, block: object) -> bool: ...


class BlockMeta:
    """Per-block state owned by the manager, which policies may read (and LRU write).

    ``ref`` holds each block's reference count (> 0: in use). A block the LRU policy
    lists holds a negative value there instead, the stamp of the batch it was
    listed in (see :class:`LRUPolicy`); every other block not in use holds 0.
    """

    __slots__ = ("ref", "hits", "registered_at")

    def __init__(self, num_blocks: int) -> None:
        self.ref = [0] * num_blocks
        self.hits = [0] * num_blocks  # prefix hits since the block was registered
        self.registered_at = [0] * num_blocks  # registration sequence number


class LRUPolicy:
    """Least recently used: the block released (or hit) longest ago goes first.

    Blocks are listed in batches, in the order they were released: ``add_many`` of a
    freed sequence appends its blocks as one batch with a new stamp ``s`` and marks
    each block ``ref[b] = -s``, a write to the ref slot ``free()`` has just touched
    (per-block links in lists of their own cost a cache miss each on a finished
    request's cold blocks). Removal from the middle only resets ``ref[b]`` to 0: the
    block's entry in its batch is stale from then on (an entry is live while
    ``ref[b] == -stamp``) and ``pop`` skips it. Stale entries are dropped when the
    head reaches them, or all at once when they outnumber the live ones.
    """

    def __init__(self, meta: BlockMeta) -> None:
        self._ref = meta.ref
        self._batches: deque[tuple[int, list[int]]] = deque()  # (stamp, blocks), oldest first
        self._pos = 0  # entries of the head batch already consumed
        self._stamp = 0
        self._len = 0  # live entries
        self._entries = 0  # entries held, stale ones included

    def add(self, block: int) -> None:
        self.add_many([block])

    def add_many(self, blocks: list[int]) -> None:
        if not blocks:
            return
        self._stamp += 1
        mark = -self._stamp
        ref = self._ref
        for b in blocks:
            ref[b] = mark
        self._batches.append((self._stamp, blocks))
        self._len += len(blocks)
        self._entries += len(blocks)
        if self._entries > 2 * self._len + 4096:
            self._compact()

    def remove(self, block: int) -> None:
        self._ref[block] = 0
        self._len -= 1

    def pop(self) -> int:
        block = self._head()
        self._ref[block] = 0
        self._len -= 1
        self._pos += 1
        self._entries -= 1
        return block

    def _head(self) -> int:
        """The oldest live block (the policy is not empty); drops stale entries before it."""
        ref, batches = self._ref, self._batches
        while True:
            stamp, blocks = batches[0]
            pos = self._pos
            while pos < len(blocks):
                b = blocks[pos]
                if ref[b] == -stamp:
                    self._entries -= pos - self._pos
                    self._pos = pos
                    return b
                pos += 1
            self._entries -= len(blocks) - self._pos
            batches.popleft()
            self._pos = 0

    def oldest(self) -> int | None:
        return self._head() if self._len else None

    def _live(self) -> list[tuple[int, list[int]]]:
        ref, out = self._ref, []
        for i, (stamp, blocks) in enumerate(self._batches):
            start = self._pos if i == 0 else 0
            live = [b for b in blocks[start:] if ref[b] == -stamp]
            if live:
                out.append((stamp, live))
        return out

    def _compact(self) -> None:
        self._batches = deque(self._live())
        self._pos = 0
        self._entries = self._len

    def order(self) -> list[int]:
        return [b for _, blocks in self._live() for b in blocks]

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and 0 <= block < len(self._ref) and self._ref[block] < 0


class _HeapPolicy:
    """Shared machinery of FIFO and LFU: ranked heap + OrderedDict of members."""

    def __init__(self, rank: list[int]) -> None:
        self._rank = rank  # per-block primary sort key, kept current by the manager
        self._blocks: OrderedDict[int, int] = OrderedDict()  # block -> version
        self._heap: list[tuple[int, int, int]] = []  # (rank, version, block)
        self._version = 0

    def add(self, block: int) -> None:
        self._version += 1
        self._blocks[block] = self._version
        heapq.heappush(self._heap, (self._rank[block], self._version, block))
        if len(self._heap) > 2 * len(self._blocks) + 64:
            self._compact()

    def add_many(self, blocks: list[int]) -> None:
        for b in blocks:
            self.add(b)

    def remove(self, block: int) -> None:
        del self._blocks[block]

    def pop(self) -> int:
        heap, blocks = self._heap, self._blocks
        while True:
            _, version, block = heapq.heappop(heap)
            if blocks.get(block) == version:
                del blocks[block]
                return block

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._blocks.get(e[2]) == e[1]]
        heapq.heapify(self._heap)

    def oldest(self) -> int | None:
        return next(iter(self._blocks), None)

    def order(self) -> list[int]:
        live = sorted(e for e in self._heap if self._blocks.get(e[2]) == e[1])
        return [e[2] for e in live]

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: object) -> bool:
        return block in self._blocks


class FIFOPolicy(_HeapPolicy):
    """First in, first out: the block registered earliest goes first."""

    def __init__(self, meta: BlockMeta) -> None:
        super().__init__(meta.registered_at)


class LFUPolicy(_HeapPolicy):
    """Least frequently used: fewest prefix hits first, ties broken by LRU.

    The version that follows the rank in each heap entry grows with every add, so
    among blocks with equal hits the one released longest ago goes first.
    """

    def __init__(self, meta: BlockMeta) -> None:
        super().__init__(meta.hits)


POLICIES: dict[str, type] = {"lru": LRUPolicy, "fifo": FIFOPolicy, "lfu": LFUPolicy}


def make_policy(name: str, meta: BlockMeta) -> EvictionPolicy:
    """Build the policy registered as ``name`` (``"lru"``, ``"fifo"`` or ``"lfu"``)."""
    if not isinstance(name, str):
        raise TypeError(f"eviction must be a policy name (str), got {type(name).__name__}")
    try:
        cls = POLICIES[name.lower()]
    except KeyError:
        raise ValueError(
            f"eviction={name!r} is not a known policy; choose one of {sorted(POLICIES)}"
        ) from None
    return cls(meta)
