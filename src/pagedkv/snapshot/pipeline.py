"""How the bytes of a save, load or verify move: digest workers and a background I/O
thread, reads that survive a damaged entry, progress bars, and lease clean-up.

Kept apart from the protocols (:mod:`~pagedkv.snapshot.save`,
:mod:`~pagedkv.snapshot.restore`) so they read as what is written and read when.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from pagedkv.errors import StoreError, StoreUnavailable
from pagedkv.stores.base import BlockStore, Buffer
from pagedkv.stores.keys import sha256_hex

# Pages smaller than this are hashed and written inline (see Workers).
THREADED_PAGE = 128 << 10


class Workers:
    """Digest workers and one background I/O thread, used only where they pay off.

    Below ``THREADED_PAGE`` bytes per page everything runs inline: per-page syscalls
    in a second thread would convoy on the GIL (each one waits for it back) and cost
    more than they overlap. Above it, a chunk's rows are hashed in ``threads`` slices
    in parallel (sha256 releases the GIL) while the previous chunk is written/read.
    """

    def __init__(self, threads: int, page_bytes: int) -> None:
        self.threads = threads if page_bytes >= THREADED_PAGE else 1
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.io = ThreadPoolExecutor(1) if self.threads > 1 else None

    def digests(self, rows: Sequence[Buffer] | np.ndarray) -> list[str]:
        """The sha256 hex digest of each row, on the digest threads when they pay off."""
        if self.pool is None or len(rows) < 2:
            return [sha256_hex(r) for r in rows]
        k = -(-len(rows) // self.threads)
        slices = [rows[i : i + k] for i in range(0, len(rows), k)]
        return [
            d
            for part in self.pool.map(lambda sl: [sha256_hex(r) for r in sl], slices)
            for d in part
        ]

    def background(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """``fn(*args)`` on the I/O thread (a future), or now (a done future)."""
        if self.io is not None:
            return self.io.submit(fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))
        return done

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for ex in (self.pool, self.io):
            if ex is not None:
                ex.shutdown(wait=True)


def read_each(backend: BlockStore, keys: Sequence[str]) -> list[bytes | None | StoreError]:
    """``backend.get_many(keys)``, where one unreadable key does not fail the others.

    If the batch raises :class:`StoreError` (a key that is a directory, a file we may
    not read), the keys are read one by one and each failing one gives its error in
    place of its value. An unreachable store (:class:`StoreUnavailable`) still raises:
    that is not damage of an entry.
    """
    try:
        return list(backend.get_many(keys))
    except StoreUnavailable:
        raise
    except StoreError:
        pass
    out: list[bytes | None | StoreError] = []
    for key in keys:
        try:
            out.append(backend.get_many([key])[0])
        except StoreUnavailable:
            raise
        except StoreError as e:
            out.append(e)
    return out


class drop_on_error:
    """Delete the keys (a failed save's leases) if the block raises."""

    def __init__(self, backend: BlockStore, keys: list[str]) -> None:
        self.backend, self.keys = backend, keys

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self.keys:
            # the original error matters more; gc removes dead leases anyway
            with contextlib.suppress(Exception):
                self.backend.delete_many(self.keys)


class progress_bar:
    """A rich progress bar over bytes when ``enabled``; a no-op callable otherwise."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled, description, total
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
