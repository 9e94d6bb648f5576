"""ByteLRU: the one "least recently used under a byte cap" index of the block stores.

MemoryStore, DiskStore and (through them) the offload tiers keep their recency here:
``key -> size`` in use order, least recent first, with the byte total kept as entries
come and go. The index only *chooses*: :meth:`ByteLRU.victims` and
:meth:`ByteLRU.oldest` name the keys to evict and change nothing, so a caller can
first copy them elsewhere (a tier spilling to the one below) and then delete them.
Not thread-safe: each store calls it under its own lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterator

from pagedkv.errors import CacheIntegrityError


class ByteLRU:
    """``key -> size`` in use order (least recent first), within ``capacity_bytes``.

    The cap is not enforced here (a store decides when and what to evict, see
    :meth:`victims`); :meth:`check` says whether it holds.
    """

    __slots__ = ("_sizes", "bytes_used", "capacity_bytes")

    def __init__(self, capacity_bytes: int) -> None:
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.bytes_used = 0
        self.capacity_bytes = capacity_bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __iter__(self) -> Iterator[str]:
        """Keys, least recently used first."""
        return iter(self._sizes)

    def size(self, key: str) -> int | None:
        """The size recorded for ``key``, or ``None`` if it is not indexed."""
        return self._sizes.get(key)

    def add(self, key: str, size: int) -> None:
        """Record ``key`` with ``size`` bytes as the most recently used (replacing it)."""
        self.bytes_used += size - self._sizes.pop(key, 0)
        self._sizes[key] = size

    def touch(self, key: str) -> bool:
        """Mark ``key`` most recently used; return whether it is indexed."""
        try:
            self._sizes.move_to_end(key)
        except KeyError:
            return False
        return True

    def pop(self, key: str) -> int | None:
        """Forget ``key``; return its size (``None`` if it was not indexed)."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self.bytes_used -= size
        return size

    def victims(self, need: int, keep: Collection[str] = ()) -> list[str]:
        """The least recently used keys (none of ``keep``) whose removal leaves room for
        ``need`` more bytes under the cap, oldest first; all but ``keep`` when that is not
        enough. Changes nothing."""
        out: list[str] = []
        room = self.capacity_bytes - self.bytes_used - need
        for key, size in self._sizes.items():
            if room >= 0:
                break
            if key not in keep:
                out.append(key)
                room += size
        return out

    def oldest(self, n: int, keep: Collection[str] = ()) -> list[str]:
        """The ``n`` least recently used keys, none of ``keep`` (fewer if there are not
        that many). Changes nothing."""
        out: list[str] = []
        if n <= 0:
            return out
        for key in self._sizes:
            if key not in keep:
                out.append(key)
                if len(out) == n:
                    break
        return out

    def check(self, who: str) -> None:
        """Raise :class:`CacheIntegrityError` naming ``who`` and the numbers if the byte
        total disagrees with the entries or exceeds the cap."""
        total = sum(self._sizes.values())
        if total != self.bytes_used or total > self.capacity_bytes:
            raise CacheIntegrityError(
                f"{who}: bytes_used({self.bytes_used}), sum of entry sizes({total}), "
                f"capacity_bytes({self.capacity_bytes}) disagree"
            )
