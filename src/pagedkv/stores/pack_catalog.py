"""PackCatalog: which pack holds which page, as one process knows its pack directory.

Plain bookkeeping over names (no I/O, not thread-safe: :class:`PackStore` calls it under
its lock): ``pack -> index`` (:class:`~pagedkv.stores.pack_format.PackIndex`), its page
bytes, ``page key -> packs holding it`` (newest last; a page can be in two packs while a
gc rewrites one), and the packs whose index does not verify.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pagedkv.errors import CacheIntegrityError
from pagedkv.stores.keys import is_page_key
from pagedkv.stores.pack_format import PackIndex


class PackCatalog:
    """The packs of one directory: their indexes and the inverse ``page -> packs``."""

    def __init__(self) -> None:
        self._packs: dict[str, PackIndex] = {}  # pack name -> its index
        self._size: dict[str, int] = {}  # pack -> value bytes (its pages)
        self._where: dict[str, list[str]] = {}  # page key -> packs holding it, newest last
        self.unreadable: set[str] = set()  # packs whose index does not verify

    def __len__(self) -> int:
        """Distinct pages."""
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def pages(self) -> Iterator[str]:
        """Every page key held by some pack."""
        return iter(self._where)

    def packs(self) -> set[str]:
        """The names of the packs indexed."""
        return set(self._packs)

    @property
    def page_bytes(self) -> int:
        """Bytes of the pages of every pack (a page in two packs counts twice)."""
        return sum(self._size.values())

    def index(self, name: str) -> PackIndex:
        """The index of pack ``name`` (``KeyError`` if it is not indexed)."""
        return self._packs[name]

    def holders(self, key: str) -> list[str]:
        """The packs holding page ``key``, newest last (a copy)."""
        return list(self._where.get(key, ()))

    def add(self, name: str, index: PackIndex) -> None:
        """Index pack ``name``."""
        self._packs[name] = index
        self._size[name] = sum(n for _, n in index.entries.values())
        for key in index.entries:
            self._where.setdefault(key, []).append(name)

    def forget(self, name: str) -> None:
        """Forget pack ``name`` (if indexed) and the pages only it held."""
        index = self._packs.pop(name, None)
        if index is None:
            return
        for key in index.entries:
            holders = self._where[key]
            holders.remove(name)
            if not holders:
                del self._where[key]
        del self._size[name]

    def locate(self, key: str) -> tuple[str, int, int] | None:
        """``(pack, offset, length)`` of page ``key`` in the newest pack holding it."""
        holders = self._where.get(key)
        if not holders:
            return None
        name = holders[-1]
        off, length = self._packs[name].entries[key]
        return name, off, length

    def runs(self, keys: Sequence[str], width: int, limit: int) -> list[tuple[str, int, range]]:
        """The runs of ``keys`` whose pages of ``width`` bytes lie back to back in one pack:
        ``(pack, offset of the first, positions in keys)``, at most ``limit`` pages each.
        Keys that are no page, not indexed or of another width are in no run."""
        where = [self.locate(k) if is_page_key(k) else None for k in keys]
        out = []
        i = 0
        while i < len(keys):
            w = where[i]
            if w is None or w[2] != width:
                i += 1
                continue
            name, off, _ = w
            j = i + 1
            while (
                j < len(keys) and j - i < limit and where[j] == (name, off + (j - i) * width, width)
            ):
                j += 1
            out.append((name, off, range(i, j)))
            i = j
        return out

    def check(self) -> None:
        """Raise :class:`CacheIntegrityError` naming the pack and the page where the indexes
        disagree: a page outside its pack's data or overlapping another, a pack's byte
        count, or ``page -> packs`` not the inverse of ``pack -> pages``."""
        for name, index in self._packs.items():
            self._check_pack(name, index)
        if self._size.keys() != self._packs.keys() or self.unreadable & self._packs.keys():
            raise CacheIntegrityError(
                f"PackStore: packs indexed ({sorted(self._packs)[:4]}), sized "
                f"({sorted(self._size)[:4]}) and unreadable ({sorted(self.unreadable)[:4]}) "
                "disagree"
            )
        for key, holders in self._where.items():
            if not holders or len(set(holders)) != len(holders):
                raise CacheIntegrityError(
                    f"PackStore: page {key} is listed in packs {holders} (none, or one twice)"
                )
            for name in holders:
                holder = self._packs.get(name)
                if holder is None or key not in holder.entries:
                    raise CacheIntegrityError(
                        f"PackStore: page {key} is listed in pack {name}, which does not hold it"
                    )

    def _check_pack(self, name: str, index: PackIndex) -> None:
        end = 0
        for key, (off, length) in sorted(index.entries.items(), key=lambda kv: kv[1]):
            if not is_page_key(key):
                raise CacheIntegrityError(f"PackStore: pack {name} holds {key!r}, not a page key")
            if off < end or length < 0:
                raise CacheIntegrityError(
                    f"PackStore: pack {name} page {key} at ({off}, {length}) overlaps the page "
                    f"before it (ending at {end})"
                )
            if off + length > index.data_bytes:
                raise CacheIntegrityError(
                    f"PackStore: pack {name} page {key} at ({off}, {length}) runs into the "
                    f"index (at {index.data_bytes})"
                )
            if name not in self._where.get(key, ()):
                raise CacheIntegrityError(
                    f"PackStore: page {key} of pack {name} is missing from the page index"
                )
            end = off + length
        total = sum(length for _, length in index.entries.values())
        if self._size.get(name) != total:
            raise CacheIntegrityError(
                f"PackStore: pack {name} counts {self._size.get(name)} page bytes, its entries "
                f"hold {total}"
            )
