"""Model generations: which registered blocks a change of the extra keys left unmatchable.

The extra keys (the model fingerprint) are part of every block's namespace, so after
:meth:`BlockManager.set_extra_keys <pagedkv.manager.BlockManager.set_extra_keys>` no
prompt matches a block registered before: nothing is touched, the change is O(1), and
the old blocks stay cached until the policy evicts them (lazily). This module only
counts them, for ``stats().invalidated_blocks``.

A generation is the span of registration stamps between two changes (stamps grow by
one per registered block, :class:`~pagedkv.manager.prefix_index.PrefixIndex`). A
sequence registers blocks only in the generation it was allocated in (blocks it fills
later hold KV of two models), so the stamp of a registered block names its generation.
For each earlier generation still holding blocks this keeps its extra keys and how many
of its blocks are registered; dropped blocks are counted off once per operation, and
only while some earlier generation holds any (a cache that never changes model pays
one flag check per eviction run).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


class Generations:
    """The current generation (``number``, ``keys``) and the registered blocks of the
    earlier ones."""

    __slots__ = ("number", "keys", "active", "_bounds", "_keys", "_live")

    def __init__(self, keys: tuple[object, ...]) -> None:
        self.number = 0
        self.keys = keys
        self.active = False  # some earlier generation still has registered blocks
        self._bounds: list[int] = []  # last registration stamp of each earlier generation
        self._keys: list[tuple[object, ...]] = []  # its extra keys
        self._live: list[int] = []  # how many of its blocks are registered

    def advance(self, keys: tuple[object, ...], registered: int, stamp: int) -> None:
        """Start a generation with ``keys``; ``registered`` blocks are registered now and
        the last registration had ``stamp``."""
        self._bounds.append(stamp)
        self._keys.append(self.keys)
        self._live.append(registered - sum(self._live))
        self.keys = keys
        self.number += 1
        self._settle()

    def dropped(self, blocks: Sequence[int], registered_at: Sequence[int]) -> None:
        """``blocks`` were unregistered (their stamps still in ``registered_at``)."""
        bounds, live = self._bounds, self._live
        last = bounds[-1]
        for b in blocks:
            stamp = registered_at[b]
            if stamp <= last:
                live[bisect_left(bounds, stamp)] -= 1
        self._settle()

    def clear(self) -> None:
        """Nothing is registered any more (a reset)."""
        self._live = [0] * len(self._live)
        self._settle()

    def _settle(self) -> None:
        self.active = any(self._live)
        if not self.active:  # no stamp needs mapping to an earlier generation
            self._bounds, self._keys, self._live = [], [], []

    def invalidated(self) -> int:
        """Registered blocks of earlier generations whose keys differ from the current
        ones (a generation with today's keys, before a change back, still matches)."""
        return sum(n for n, k in zip(self._live, self._keys) if k != self.keys)

    def generation_of(self, stamp: int) -> int:
        """The generation a block registered with ``stamp`` belongs to."""
        if not self._bounds or stamp > self._bounds[-1]:
            return self.number
        return self.number - len(self._bounds) + bisect_left(self._bounds, stamp)

    def violations(self, hashes: Sequence[bytes], registered_at: Sequence[int]) -> list[str]:
        """What disagrees with the registered blocks' stamps (empty: all holds)."""
        problems = []
        if self._bounds != sorted(self._bounds):
            problems.append(f"generation bounds {self._bounds} are not increasing")
            return problems
        counted = [0] * len(self._live)
        first = self.number - len(self._bounds)
        for b, h in enumerate(hashes):
            if h:
                g = self.generation_of(registered_at[b])
                if g < self.number:
                    counted[g - first] += 1
        if counted != self._live:
            problems.append(
                f"earlier generations count {self._live} registered blocks, "
                f"their stamps say {counted}"
            )
        if self.active != any(self._live):
            problems.append(f"generations active={self.active} but count {self._live}")
        return problems
