"""The one ``paused()`` of the :class:`~pagedkv.snapshot.pager.CachePager` implementations
(:class:`~pagedkv.KVCache`, :class:`~pagedkv.testing.SyntheticPager`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Pausable:
    """Mixin: :meth:`paused` counts nested pauses in ``_paused`` (the subclass sets it to
    0 and refuses its mutations, with its own error, while it is not 0)."""

    _paused: int

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Refuse mutations (allocate/append/fork/free/swap/writes) until the block exits,
        while a snapshot reads the blocks; reads still work."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
