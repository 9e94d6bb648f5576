"""Pins: prefixes kept from eviction, by content.

A pin names block hashes (the full blocks of a prefix in one namespace), so blocks
of that prefix registered later are protected too, and pins nest (a count per
hash). A cached block whose hash is pinned is held here, out of the eviction
policy, until the last pin on its hash is released. A pin remembers its block's index
key and salt, so a change of the model fingerprint moves it to the same tokens under
the new namespace (:meth:`Pins.rekey`).
"""

from __future__ import annotations

from collections.abc import Callable

from pagedkv.manager.eviction import EvictionPolicy
from pagedkv.manager.hashing import ROOT
from pagedkv.manager.prefix_index import PrefixIndex


class Pins:
    """``counts``: block hash -> pins on it (>= 1); ``sources``: block hash -> (its
    index key, the salt it was pinned with), in the order first pinned (parents first);
    ``blocks``: the cached blocks (ref 0) held out of the eviction policy because their
    hash is pinned."""

    __slots__ = ("counts", "sources", "blocks")

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}
        self.sources: dict[bytes, tuple[bytes, object]] = {}
        self.blocks: set[int] = set()

    def pin(
        self,
        keys: list[tuple[bytes, bytes]],
        index: PrefixIndex,
        policy: EvictionPolicy,
        salt: object = None,
    ) -> int:
        """Pin each (index key, hash) of a prefix (of ``salt``) once; cached blocks of it
        leave the policy. Returns how many of its blocks are resident (cached or in use)."""
        resident = 0
        for key, h in keys:
            count = self.counts.get(h, 0)
            if not count:
                self.sources[h] = (key, salt)
            self.counts[h] = count + 1
            block = index.by_key.get(key)
            if block is not None:
                resident += 1
                if block in policy:
                    policy.remove(block)
                    self.blocks.add(block)
        return resident

    def is_pinned(self, keys: list[tuple[bytes, bytes]]) -> bool:
        """Whether every hash of the prefix holds a pin."""
        return bool(keys) and all(h in self.counts for _, h in keys)

    def unpin(self, keys: list[tuple[bytes, bytes]], index: PrefixIndex) -> list[int]:
        """Release one pin on each hash (all pinned); returns the cached blocks whose
        last pin went, tail first (evicting the head first would orphan the rest)."""
        released = []
        for key, h in keys:
            count = self.counts[h] - 1
            if count:
                self.counts[h] = count
                continue
            del self.counts[h]
            del self.sources[h]
            block = index.by_key.get(key)
            if block is not None and block in self.blocks:
                self.blocks.discard(block)
                released.append(block)
        released.reverse()
        return released

    def rekey(
        self,
        namespace_of: Callable[[object], bytes],
        digest: Callable[[bytes], bytes],
        index: PrefixIndex,
        policy: EvictionPolicy,
    ) -> list[int]:
        """Move every pin to the same tokens under the namespaces ``namespace_of(salt)``
        (the index's new extra keys): counts carry over, cached blocks of the new hashes
        are held, and the blocks held until now are returned (for the policy)."""
        released = list(self.blocks)
        self.blocks.clear()
        step = 4 * index.block_size
        moved: dict[bytes, bytes] = {ROOT: ROOT}
        counts: dict[bytes, int] = {}
        sources: dict[bytes, tuple[bytes, object]] = {}
        for h, (key, salt) in self.sources.items():  # parents first: moved[parent] is set
            parent = key[: len(key) - 16 - step]
            new_key = moved[parent] + namespace_of(salt) + key[len(key) - step :]
            new = moved[h] = digest(new_key)
            counts[new], sources[new] = self.counts[h], (new_key, salt)
            block = index.by_key.get(new_key)
            if block is not None and block in policy:
                policy.remove(block)
                self.blocks.add(block)
        self.counts, self.sources = counts, sources
        return released

    def hold(self, released: list[int], hashes: list[bytes]) -> list[int]:
        """Keep the just-released blocks whose hash is pinned; returns the others."""
        counts = self.counts
        keep = [b for b in released if hashes[b] in counts]
        if not keep:
            return released
        self.blocks.update(keep)
        return [b for b in released if hashes[b] not in counts]

    def violations(self, hashes: list[bytes], evictable: set[int], block_size: int) -> list[str]:
        """What disagrees between the pins, the held blocks and the registrations."""
        problems = []
        if any(hashes[b] not in self.counts for b in self.blocks):
            problems.append("a block is held pinned but its hash is not pinned")
        if any(hashes[b] in self.counts for b in evictable):
            problems.append("a pinned prefix block is evictable")
        if any(count < 1 for count in self.counts.values()):
            problems.append(f"pin counts must be >= 1, got {sorted(set(self.counts.values()))[:5]}")
        if self.sources.keys() != self.counts.keys():
            problems.append(f"{len(self.sources)} pin sources for {len(self.counts)} pinned hashes")
        else:
            seen = {ROOT}
            for h, (key, _) in self.sources.items():
                if key[: len(key) - 16 - 4 * block_size] not in seen:
                    problems.append(
                        "a pinned block's parent is neither the root nor pinned before it"
                    )
                    break
                seen.add(h)
        return problems
