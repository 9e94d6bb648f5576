"""The save / load data path's machinery: page reads, digest workers, progress, flush.

Kept apart from :mod:`pagedkv.snapshot.store` so the store reads as the protocol
(what is written when); this is how the bytes move.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from pagedkv.errors import StoreError, StoreUnavailable
from pagedkv.storage.host import host_bytes

# Pages smaller than this are hashed and written inline (see Workers).
THREADED_PAGE = 128 << 10
PAGE_SUFFIX = ".pg"


def page_key(digest: str) -> str:
    """The store key of the page with sha256 hex ``digest``."""
    return digest + PAGE_SUFFIX


def sha256_hex(row: Any) -> str:
    return hashlib.sha256(row).hexdigest()  # releases the GIL: rows hash in parallel


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

    def digests(self, rows: Sequence[Any]) -> list[str]:
        if self.pool is None or len(rows) < 2:
            return [sha256_hex(r) for r in rows]
        k = -(-len(rows) // self.threads)
        slices = [rows[i : i + k] for i in range(0, len(rows), k)]
        return [
            d
            for part in self.pool.map(lambda sl: [sha256_hex(r) for r in sl], slices)
            for d in part
        ]

    def background(self, fn: Callable[..., Any], *args: Any) -> Any:
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


class Fetched(NamedTuple):
    """Pages read and checked: ``rows`` (``uint8 [n, bpb]``; with ``keep``, row ``i``
    holds page ``i`` once it verified), and the digests ``missing`` or ``corrupt``."""

    rows: torch.Tensor
    missing: list[str]
    corrupt: list[str]


def fetch_pages(
    backend: Any,
    digests: Sequence[str],
    bpb: int,
    *,
    chunk_bytes: int,
    threads: int,
    keep: bool,
    progress: bool,
    what: str,
) -> Fetched:
    """Read every page of ``digests`` and check its length and sha256.

    Pages are read straight into the rows where the backend can (``get_into``: no
    intermediate ``bytes``), the next chunk being read while this one is hashed.
    Without ``keep`` two chunk-sized buffers alternate (a verify).
    """
    step = max(1, chunk_bytes // bpb)
    chunks = [range(a, min(len(digests), a + step)) for a in range(0, len(digests), step)]
    rows = host_bytes(len(digests) if keep else 2 * min(step, len(digests)), bpb)
    missing: list[str] = []
    corrupt: list[str] = []

    def read(j: int) -> tuple[torch.Tensor, list[int | None]]:
        """Chunk ``j`` into its rows; per page: bytes present (``None``: missing)."""
        part = chunks[j]
        a = part.start if keep else (j % 2) * step
        out = rows[a : a + len(part)]
        return out, _read_pages(backend, [digests[i] for i in part], out, bpb)

    with Workers(threads, bpb) as work, progress_bar(progress, what, len(digests) * bpb) as bar:
        ahead = work.background(read, 0) if chunks else None
        for j, part in enumerate(chunks):
            out, sizes = ahead.result()  # read the next chunk while this one is checked
            if j + 1 < len(chunks):
                ahead = work.background(read, j + 1)
            names = [digests[i] for i in part]
            missing += [d for d, n in zip(names, sizes) if n is None]
            corrupt += [d for d, n in zip(names, sizes) if n is not None and n != bpb]
            good = [k for k, n in enumerate(sizes) if n == bpb]
            arr = out.numpy()
            for k, h in zip(good, work.digests([memoryview(arr[k]) for k in good])):
                if h != names[k]:
                    corrupt.append(names[k])
            bar(len(part) * bpb)
    return Fetched(rows, missing, corrupt)


def _read_pages(backend: Any, digests: list[str], out: torch.Tensor, bpb: int) -> list[int | None]:
    """Pages into ``out`` rows; per page the bytes found (``None``: missing).

    A page of another size is reported with its size and leaves its row as it was.
    """
    keys = [page_key(d) for d in digests]
    get_into = getattr(backend, "get_into", None)
    found = get_into(keys, out) if get_into is not None else [False] * len(keys)
    sizes: list[int | None] = [bpb if f else None for f in found]
    retry = [k for k, f in enumerate(found) if not f]
    if retry:  # no get_into, or a page missing or of another size: plain reads
        arr = out.numpy()
        for k, v in zip(retry, backend.get_many([keys[k] for k in retry])):
            if v is not None:
                sizes[k] = len(v)
                if len(v) == bpb:
                    arr[k] = np.frombuffer(v, dtype=np.uint8)
    return sizes


def read_each(backend: Any, keys: Sequence[str]) -> list[bytes | None | StoreError]:
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

    def __init__(self, backend: Any, keys: list[str]) -> None:
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


def syncfs(fd: int) -> None:
    """Flush the file system holding ``fd`` (Linux ``syncfs``; ``os.sync`` elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()
