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

# Entries of one chunk at most: appends extend the newest chunk of the same reason, so
# the deque holds few objects however small the eviction runs are, and the oldest go a
# whole chunk at a time (dropping entries from a list's front would move the rest).
_CHUNK = 4096
# Host bytes per remembered hash besides the digest itself: a list slot (8) and the
# bytes object's header (33 for CPython 3.11, 64-bit).
_SLOT_BYTES = 8 + sys.getsizeof(b"")


class Ghosts:
    """Recently dropped block hashes with why they went (``EVICTED`` or ``EXPIRED``).

    ``max_bytes`` caps the host bytes held (0: remember nothing); ``digest_bytes`` is
    the length of one hash. The oldest records go a chunk (1/16 of the cap) at a time,
    so at least 7/8 of the last ``max_entries`` hashes are remembered, never more.
    """

    __slots__ = ("max_entries", "_chunk", "_chunks", "_sealed", "_open", "_reason")

    def __init__(self, max_bytes: int, digest_bytes: int) -> None:
        self.max_entries = max_bytes // (_SLOT_BYTES + digest_bytes)
        self._chunk = min(_CHUNK, self.max_entries // 16) or min(1, self.max_entries)
        self._chunks: deque[tuple[str, list[bytes]]] = deque()  # oldest first; last: open
        self._sealed = 0  # entries in the chunks before the open one
        self._open: list[bytes] = []  # the newest chunk, filling up
        self._reason = ""  # the open chunk's reason

    def __len__(self) -> int:
        return self._sealed + len(self._open)

    def add(self, hashes: list[bytes], reason: str) -> None:
        """Remember ``hashes`` (dropped just now, for ``reason``)."""
        open_ = self._open
        if reason is self._reason and len(open_) + len(hashes) <= self._chunk:
            open_ += hashes  # the eviction path: one check and an extend
        else:
            self._start(hashes, reason)

    def _start(self, hashes: list[bytes], reason: str) -> None:
        """Seal the open chunk and open new ones holding ``hashes`` (a large run, e.g. a
        reset, in chunks of the usual size); drop the oldest so that the open chunk can
        fill without passing the cap."""
        size = self._chunk
        if not size or not hashes:
            return
        chunks = self._chunks
        for i in range(0, len(hashes), size):
            self._sealed += len(self._open)
            self._open, self._reason = hashes[i : i + size], reason
            chunks.append((reason, self._open))
        while self._sealed + size > self.max_entries and len(chunks) > 1:
            self._sealed -= len(chunks.popleft()[1])

    def clear(self) -> None:
        """Forget everything."""
        self._chunks.clear()
        self._sealed = 0
        self._open, self._reason = [], ""

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
        problems = []
        chunks = list(self._chunks)
        sealed = sum(len(chunk) for _, chunk in chunks[:-1])
        if sealed != self._sealed or (chunks and chunks[-1][1] is not self._open):
            problems.append(
                f"ghost list holds {sealed} hashes in sealed chunks but counts {self._sealed}"
            )
        if len(self) > self.max_entries:
            problems.append(
                f"ghost list holds {len(self)} hashes, over its cap of {self.max_entries}"
            )
        if any(reason not in (EVICTED, EXPIRED) for reason, _ in chunks):
            problems.append("ghost list holds a record that is neither evicted nor expired")
        return problems
