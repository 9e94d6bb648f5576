"""Eviction policies over *cached* blocks (ref count 0, hash registered, not pinned).

Every policy keeps its blocks in the order they became cached, with O(1) add and
O(1) removal from the middle (a cached block hit by a new prompt leaves the policy
without a scan); the head is the block cached longest ago (what TTL expiry needs).
LRU evicts that head; FIFO and LFU keep a heap of candidates on top, with lazy
deletion: an entry whose block left the policy (or came back later) is stale and
skipped when it surfaces.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
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
    """Per-block counters a policy may rank by; owned and updated by the manager."""

    __slots__ = ("hits", "registered_at")

    def __init__(self, num_blocks: int) -> None:
        self.hits = [0] * num_blocks  # prefix hits since the block was registered
        self.registered_at = [0] * num_blocks  # registration sequence number


class LRUPolicy:
    """Least recently used: the block released (or hit) longest ago goes first.

    A hand-made doubly linked list in two int lists, ``_next[b]`` and ``_prev[b]``
    (-1 when ``b`` is not listed), with a sentinel at ``b = num_blocks``. Add,
    removal from the middle and pop are O(1) with no allocation per operation, and
    a whole released sequence is linked in one pass. (An ``OrderedDict`` costs a
    node allocation per insert, and one interleaved list costs index arithmetic per
    link; both were slower on the standard trace.)
    """

    def __init__(self, meta: BlockMeta) -> None:
        n = len(meta.hits)
        self._head = n
        self._next = [-1] * (n + 1)
        self._prev = [-1] * (n + 1)
        self._next[n] = self._prev[n] = n  # empty: the sentinel loops
        self._len = 0

    def add(self, block: int) -> None:
        self.add_many([block])

    def add_many(self, blocks: list[int]) -> None:
        if not blocks:
            return
        nxt, prv, head = self._next, self._prev, self._head
        last = prv[head]
        for b in blocks:
            nxt[last] = b
            prv[b] = last
            last = b
        nxt[last] = head
        prv[head] = last
        self._len += len(blocks)

    def remove(self, block: int) -> None:
        nxt, prv = self._next, self._prev
        p, q = prv[block], nxt[block]
        nxt[p] = q
        prv[q] = p
        nxt[block] = prv[block] = -1
        self._len -= 1

    def pop(self) -> int:
        block = self._next[self._head]
        self.remove(block)
        return block

    def oldest(self) -> int | None:
        block = self._next[self._head]
        return None if block == self._head else block

    def order(self) -> list[int]:
        out, nxt, b = [], self._next, self._next[self._head]
        while b != self._head:
            out.append(b)
            b = nxt[b]
        return out

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and 0 <= block < self._head and self._prev[block] != -1


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
