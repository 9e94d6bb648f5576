"""Write-back queue: demoted blocks wait here, readable, until a thread stores them.

Eviction must not wait for a disk or a network, so ``TieredStore.demote`` only
gathers the blocks' bytes into a host staging tensor and hands it to this queue;
one background thread performs the store puts. The queue is bounded in bytes:
``submit`` blocks while the staged bytes would exceed the budget (back-pressure
instead of unbounded host memory). A block stays findable (``find``) until its
job is done, so a prefix hit right after eviction is served from staging.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from pagedkv.errors import CacheIntegrityError

log = logging.getLogger("pagedkv.tiers")

# An idle writer thread exits after this long, so a cache that is never closed
# does not keep a thread (and, through it, the cache) alive forever.
IDLE_EXIT_SECONDS = 2.0
# After close(timeout) gave up and dropped the queue, the job being stored stops at its
# next batch; this is how long close waits for that.
DROP_GRACE_SECONDS = 5.0


class JobDropped(Exception):
    """Raised in the writer, between batches, when close() drops the remaining work."""


@dataclass(eq=False)
class Job:
    """Blocks to store: row ``i`` of ``rows`` (host ``uint8 [n, bytes_per_block]``) is ``keys[i]``.

    ``event`` (CUDA) completes when ``rows`` holds the bytes; ``all_levels`` asks for
    every tier (write-through) instead of only the first (write-back).
    """

    keys: list[str]
    rows: torch.Tensor
    event: torch.cuda.Event | None = None
    all_levels: bool = False
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.rows.numel()

    def ready(self) -> torch.Tensor:
        """The rows, once the copy that fills them has completed."""
        if self.event is not None:
            self.event.synchronize()
        return self.rows


class Staged(NamedTuple):
    """Where a block waiting to be stored is: row ``row`` of ``job.rows``."""

    job: Job
    row: int


class WriteBack:
    """One background thread running ``sink(job)`` for each submitted job, in order."""

    def __init__(self, sink: Callable[[Job], None], max_pending_bytes: int) -> None:
        self._sink = sink
        self._max = max_pending_bytes
        self._cv = threading.Condition()
        self._jobs: deque[Job] = deque()  # the head is being stored; removed when done
        self._pending: dict[str, Staged] = {}  # key -> its newest staged copy
        self._pending_bytes = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self._drop = False  # close() gave up waiting: jobs not started are dropped
        self._readers = 0  # prefix lookups in progress
        self.lost_blocks = 0  # blocks of jobs that failed or were dropped, never stored

    @property
    def pending_bytes(self) -> int:
        """Bytes staged and not yet stored."""
        return self._pending_bytes

    @property
    def running(self) -> bool:
        """Whether the writer thread is alive (storing, or idle before it exits)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def __len__(self) -> int:
        """Blocks staged and not yet stored."""
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue ``job``; waits while the budget is full (a single job always fits)."""
        with self._cv:
            if self._stop:
                raise ValueError("TieredStore is closed")
            while self._pending_bytes and self._pending_bytes + job.nbytes > self._max:
                self._cv.wait()
            self._jobs.append(job)
            self._pending_bytes += job.nbytes
            for i, key in enumerate(job.keys):
                self._pending[key] = Staged(job, i)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pagedkv-tiers-writeback", daemon=True
                )
                self._thread.start()
            self._cv.notify_all()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Mark a prefix lookup in progress: :meth:`yield_to_readers` waits meanwhile."""
        with self._cv:
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                self._cv.notify_all()

    def yield_to_readers(self) -> None:
        """Called by the writer between batches: wait while a lookup is in progress.

        A lookup is on the critical path (time to first token); write-back is not.
        """
        with self._cv:
            while self._readers and not self._stop:
                self._cv.wait()
            if self._drop:
                raise JobDropped

    def find(self, key: str) -> Staged | None:
        """Where ``key`` is staged, if it is waiting to be stored."""
        return self._pending.get(key)

    def check_integrity(self) -> None:
        """Raise :class:`~pagedkv.errors.CacheIntegrityError` when the queue's bookkeeping
        disagrees: the staged bytes against the queued jobs, or the ``key -> staged row``
        index against the jobs' keys (each key of a queued job findable, in that job or a
        later one; nothing findable that no queued job holds)."""
        with self._cv:
            queued = sum(job.nbytes for job in self._jobs)
            if queued != self._pending_bytes:
                raise CacheIntegrityError(
                    f"WriteBack: pending_bytes({self._pending_bytes}) != bytes of the "
                    f"{len(self._jobs)} queued jobs({queued})"
                )
            order = {id(job): n for n, job in enumerate(self._jobs)}
            for key, (job, row) in self._pending.items():
                if id(job) not in order or not 0 <= row < len(job.keys) or job.keys[row] != key:
                    raise CacheIntegrityError(
                        f"WriteBack: key {key!r} is indexed at row {row} of a job that "
                        "is not queued or does not hold it there"
                    )
            for job in self._jobs:
                for key in job.keys:
                    hit = self._pending.get(key)
                    if hit is None or order[id(hit.job)] < order[id(job)]:
                        raise CacheIntegrityError(
                            f"WriteBack: key {key!r} of a queued job is not findable "
                            "(a prefix hit on it would miss)"
                        )
            if self.lost_blocks < 0 or self._readers < 0:
                raise CacheIntegrityError(
                    f"WriteBack: lost_blocks({self.lost_blocks}) or readers({self._readers}) "
                    "below 0"
                )

    def flush(self) -> None:
        """Wait until every submitted job has been stored."""
        with self._cv:
            while self._jobs:
                self._cv.wait()

    def close(self, timeout: float | None = None) -> int:
        """Store what is queued, then stop the thread; returns :attr:`lost_blocks`.

        With ``timeout`` (seconds), the work not done by then is dropped (counted in
        ``lost_blocks``): the job being stored stops at its next batch, within
        :data:`DROP_GRACE_SECONDS` unless a store hangs.
        """
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                with self._cv:
                    self._drop = True
                    self._cv.notify_all()
                thread.join(DROP_GRACE_SECONDS)
        with self._cv:
            return self.lost_blocks + (sum(len(j.keys) for j in self._jobs) if self._drop else 0)

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._jobs and not self._stop:
                    self._cv.wait(IDLE_EXIT_SECONDS)
                if not self._jobs:  # stopped, or idle: exit (submit starts a new thread)
                    self._thread = None
                    return
                job = self._jobs[0]
            try:
                self._sink(job)
                stored = True
            except JobDropped:
                stored = False
            except Exception:  # the thread must survive anything: a lost write is a miss
                log.exception("pagedkv.tiers: storing %d demoted blocks failed", len(job.keys))
                stored = False
            with self._cv:
                self._finish(self._jobs.popleft(), stored)
                while self._drop and self._jobs:
                    self._finish(self._jobs.popleft(), False)
                self._cv.notify_all()

    def _finish(self, job: Job, stored: bool) -> None:
        """Forget a job that was stored (or failed, or is dropped); under the lock."""
        if not stored:
            self.lost_blocks += len(job.keys)
        self._pending_bytes -= job.nbytes
        for key in job.keys:
            hit = self._pending.get(key)
            if hit is not None and hit.job is job:
                del self._pending[key]
