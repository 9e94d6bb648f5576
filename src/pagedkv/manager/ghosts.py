"""Ghosts: the hashes of blocks recently evicted or expired from the device, byte-capped.

``explain`` reads them to tell a block that was cached and went away ("evicted",
"expired") from one never seen. The manager hands over each eviction run's hashes as
one list (the hash objects the prefix index just let go of, so nothing is copied);
the oldest entries go first once the byte budget is spent, and the latest record of a
hash wins. A lookup scans them all (explain is a diagnostic; the eviction path only
appends, and no index is kept to cost memory).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Sequence

EVICTED = "evicted"
EXPIRED = "expired"

# Entries of one chunk: appends extend the newest chunk of the same reason up to this
# many, so the deque holds few objects however small the eviction runs are.
_CHUNK = 4096
# Host bytes per remembered hash besides the digest itself: a list slot (8) and the
# bytes object's header (33 for CPython 3.11, 64-bit).
_SLOT_BYTES = 8 + sys.getsizeof(b"")


class Ghosts:
    """Recently dropped block hashes with why they went (``EVICTED`` or ``EXPIRED``).

    ``max_bytes`` caps the host bytes held (0: remember nothing); ``digest_bytes`` is
    the length of one hash.
    """

    __slots__ = ("max_entries", "_chunks", "_count")

    def __init__(self, max_bytes: int, digest_bytes: int) -> None:
        self.max_entries = max_bytes // (_SLOT_BYTES + digest_bytes)
        self._chunks: deque[tuple[str, list[bytes]]] = deque()  # oldest first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, hashes: list[bytes], reason: str) -> None:
        """Remember ``hashes`` (dropped just now, for ``reason``)."""
        if not self.max_entries or not hashes:
            return
        chunks = self._chunks
        if chunks and chunks[-1][0] == reason and len(chunks[-1][1]) < _CHUNK:
            chunks[-1][1].extend(hashes)
        else:
            chunks.append((reason, list(hashes)))
        self._count += len(hashes)
        if self._count > self.max_entries:
            self._trim()

    def _trim(self) -> None:
        chunks, over = self._chunks, self._count - self.max_entries
        while over > 0:
            oldest = chunks[0][1]
            if len(oldest) <= over:
                chunks.popleft()
                over -= len(oldest)
                self._count -= len(oldest)
            else:
                del oldest[:over]
                self._count -= over
                over = 0

    def clear(self) -> None:
        """Forget everything."""
        self._chunks.clear()
        self._count = 0

    def reasons(self, hashes: Sequence[bytes]) -> list[str | None]:
        """Why each hash was dropped (its latest record), ``None`` where not remembered."""
        want = set(hashes)
        found: dict[bytes, str] = {}
        for reason, chunk in reversed(self._chunks):  # newest first: the latest record wins
            for h in want.intersection(chunk):
                found.setdefault(h, reason)
        return [found.get(h) for h in hashes]

    def violations(self) -> list[str]:
        """What disagrees in the bookkeeping (empty: all holds)."""
        held = sum(len(chunk) for _, chunk in self._chunks)
        problems = []
        if held != self._count:
            problems.append(f"ghost list holds {held} hashes but counts {self._count}")
        if held > self.max_entries:
            problems.append(f"ghost list holds {held} hashes, over its cap of {self.max_entries}")
        if any(reason not in (EVICTED, EXPIRED) for reason, _ in self._chunks):
            problems.append("ghost list holds a record that is neither evicted nor expired")
        return problems
