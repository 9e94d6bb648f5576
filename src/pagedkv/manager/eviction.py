"""Eviction policies over *cached* blocks (ref count 0, hash registered, not pinned).

Every policy keeps its blocks in the order they became cached, with O(1) add and
O(1) (amortized) removal from the middle (a cached block hit by a new prompt leaves
the policy without a scan); the head is the block cached longest ago. LRU evicts
that head; FIFO and LFU keep a heap of candidates on top. All three delete lazily:
an entry whose block left the policy (or came back later) is stale and skipped when
it surfaces. TTL is a wrapper around any of them (:class:`TTLPolicy`).

Besides add/remove/pop, a policy answers three hooks the manager calls once per
operation, never per block of a loop: :meth:`~EvictionPolicy.usable` (how much of a
prefix match may be used), :meth:`~EvictionPolicy.on_hits` (blocks a prompt reused)
and :meth:`~EvictionPolicy.expire` (blocks to drop before blocks are handed out).
They do nothing unless a policy needs them (LFU counts hits; TTL cuts and expires).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Protocol

_NOTHING: tuple[int, ...] = ()


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

    def usable(self, hits: list[int]) -> list[int]:
        """The leading part of a prefix match (blocks in use or listed here) that may be
        reused; changes nothing."""

    def on_hits(self, hits: list[int]) -> None:
        """A prompt reused ``hits`` (they already left the policy if they were in it)."""

    def expire(self) -> Sequence[int]:
        """Remove and return the blocks that must be dropped before blocks are handed out
        (not evictions: their bytes are not worth keeping)."""

    def violations(self) -> list[str]:
        """What disagrees in the policy's own bookkeeping (empty: all holds)."""

    def __len__(self) -> int: ...
    def __contains__(self, block: object) -> bool: ...


class BlockMeta:
    """Per-block state owned by the manager, which policies may read (and LRU write).

    ``ref`` holds each block's reference count (> 0: in use). A block the LRU policy
    lists holds a negative value there instead, the stamp of the batch it was
    listed in (see :class:`LRUPolicy`); every other block not in use holds 0.
    ``hits`` and ``registered_at`` are reset when a block is registered (LFU and
    FIFO rank by them).
    """

    __slots__ = ("ref", "hits", "registered_at")

    def __init__(self, num_blocks: int) -> None:
        self.ref = [0] * num_blocks
        self.hits = [0] * num_blocks  # prefix hits since the block was registered
        self.registered_at = [0] * num_blocks  # registration sequence number


class _NoHooks:
    """The hooks of a policy that neither counts hits nor expires blocks."""

    def usable(self, hits: list[int]) -> list[int]:
        return hits

    def on_hits(self, hits: list[int]) -> None:
        return None

    def expire(self) -> Sequence[int]:
        return _NOTHING


def _stray_stamps(ref: list[int], listed: set[int], policy: str) -> list[str]:
    stray = [b for b, r in enumerate(ref) if r < 0 and b not in listed]
    if not stray:
        return []
    return [
        f"blocks {stray[:5]} hold an LRU stamp (ref < 0) but the {policy} policy does not list them"
    ]


class LRUPolicy(_NoHooks):
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

    def violations(self) -> list[str]:
        problems = []
        held = sum(len(blocks) for _, blocks in self._batches) - self._pos
        if held != self._entries:
            problems.append(f"LRU holds {held} batch entries but counts {self._entries}")
        stamps = [stamp for stamp, _ in self._batches]
        if stamps != sorted(set(stamps)) or (stamps and stamps[-1] > self._stamp):
            problems.append(
                f"LRU batch stamps {stamps[:5]}... are not increasing up to the last "
                f"({self._stamp})"
            )
        return problems + _stray_stamps(self._ref, set(self.order()), "LRU")

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and 0 <= block < len(self._ref) and self._ref[block] < 0


class _HeapPolicy(_NoHooks):
    """Shared machinery of FIFO and LFU: ranked heap + OrderedDict of members."""

    NAME = ""

    def __init__(self, meta: BlockMeta, rank: list[int]) -> None:
        self._ref = meta.ref
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

    def violations(self) -> list[str]:
        return _stray_stamps(self._ref, set(), self.NAME)  # stamps are LRU's alone

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: object) -> bool:
        return block in self._blocks


class FIFOPolicy(_HeapPolicy):
    """First in, first out: the block registered earliest goes first."""

    NAME = "FIFO"

    def __init__(self, meta: BlockMeta) -> None:
        super().__init__(meta, meta.registered_at)


class LFUPolicy(_HeapPolicy):
    """Least frequently used: fewest prefix hits first, ties broken by LRU.

    The version that follows the rank in each heap entry grows with every add, so
    among blocks with equal hits the one released longest ago goes first.
    """

    NAME = "LFU"

    def __init__(self, meta: BlockMeta) -> None:
        super().__init__(meta, meta.hits)

    def on_hits(self, hits: list[int]) -> None:
        counts = self._rank
        for b in hits:
            counts[b] += 1


class TTLPolicy:
    """Any policy, plus expiry: a cached block idle longer than ``ttl_seconds`` is never
    matched again and is dropped (made free, not evicted: ``on_evict`` is not called)
    before any block is handed out.

    Idle time counts from when the block was last added (its last reference dropped or
    its pin released); ``clock`` gives seconds (monotonic).
    """

    def __init__(
        self,
        inner: EvictionPolicy,
        num_blocks: int,
        ttl_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.inner = inner
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._cached_at = [0.0] * num_blocks

    def add(self, block: int) -> None:
        self._cached_at[block] = self._clock()
        self.inner.add(block)

    def add_many(self, blocks: list[int]) -> None:
        now, cached_at = self._clock(), self._cached_at
        for b in blocks:
            cached_at[b] = now
        self.inner.add_many(blocks)

    def remove(self, block: int) -> None:
        self.inner.remove(block)

    def pop(self) -> int:
        return self.inner.pop()

    def oldest(self) -> int | None:
        return self.inner.oldest()

    def order(self) -> list[int]:
        return self.inner.order()

    def usable(self, hits: list[int]) -> list[int]:
        # Blocks in use never expire; a cached one listed here expires once idle too long.
        deadline = self._clock() - self.ttl_seconds
        inner, cached_at = self.inner, self._cached_at
        for i, b in enumerate(hits):
            if b in inner and cached_at[b] < deadline:
                return hits[:i]
        return self.inner.usable(hits)

    def on_hits(self, hits: list[int]) -> None:
        self.inner.on_hits(hits)

    def expire(self) -> list[int]:
        deadline = self._clock() - self.ttl_seconds
        inner, out = self.inner, list[int]()
        while True:
            block = inner.oldest()
            if block is None or self._cached_at[block] >= deadline:
                return out
            inner.remove(block)
            out.append(block)

    def violations(self) -> list[str]:
        return self.inner.violations()

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, block: object) -> bool:
        return block in self.inner


POLICIES: dict[str, type[LRUPolicy] | type[FIFOPolicy] | type[LFUPolicy]] = {
    "lru": LRUPolicy, "fifo": FIFOPolicy, "lfu": LFUPolicy,
}  # fmt: skip


def policy_name(name: object) -> str:
    """``name`` as a registered policy name (lower case); ``TypeError``/``ValueError`` if not."""
    if not isinstance(name, str):
        raise TypeError(f"eviction must be a policy name (str), got {type(name).__name__}")
    if name.lower() not in POLICIES:
        raise ValueError(
            f"eviction={name!r} is not a known policy; choose one of {sorted(POLICIES)}"
        )
    return name.lower()


def make_policy(
    name: str,
    meta: BlockMeta,
    *,
    ttl_seconds: float | None = None,
    clock: Callable[[], float] | None = None,
) -> EvictionPolicy:
    """Build the policy registered as ``name`` (``"lru"``, ``"fifo"`` or ``"lfu"``),
    wrapped in a :class:`TTLPolicy` when ``ttl_seconds`` is given (``clock`` then too)."""
    policy: EvictionPolicy = POLICIES[policy_name(name)](meta)
    if ttl_seconds is None:
        return policy
    if clock is None:
        raise TypeError("make_policy(ttl_seconds=...) needs a clock (e.g. time.monotonic)")
    return TTLPolicy(policy, len(meta.ref), ttl_seconds, clock)
