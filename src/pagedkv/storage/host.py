"""Host (CPU) byte rows for staging blocks: fresh ones, and a cache that recycles them.

Fresh host memory costs its first touch: the kernel zeroes every page as it faults
in, and with ``defrag=madvise`` a huge-page fault may compact memory first. Measured
here (2 cores, shared): a gather of 128 MiB into fresh rows ran at 1.2-6 GB/s,
depending on the machine's memory state, against ~11 GB/s into warm rows.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

MIN_RECYCLED = 1 << 20  # below this, allocation is cheap enough
IDLE_BYTES = 256 << 20  # what a cache holds for reuse, at most


def host_bytes(n: int, row_bytes: int) -> torch.Tensor:
    """Uninitialised CPU ``uint8 [n, row_bytes]``, allocated through numpy.

    numpy asks for transparent huge pages on large buffers (``madvise``); torch's CPU
    allocator does not, and the first write into fresh 4 KiB pages of a large buffer
    runs at ~1.4 GB/s here against ~6 GB/s with huge pages.
    """
    return torch.from_numpy(np.empty((n, row_bytes), dtype=np.uint8))


class HostRowCache:
    """CPU host rows that come back here for reuse once no tensor views them any more.

    The CPU counterpart of torch's pinned caching allocator on CUDA: swap-out and
    swap-in, demotion and promotion batches repeat the same sizes, so warm buffers
    are handed out again. At most ``max_bytes`` sit idle (oldest freed first); a
    request larger than that, or under :data:`MIN_RECYCLED`, gets fresh memory.
    """

    def __init__(self, max_bytes: int = IDLE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._idle: list[np.ndarray] = []  # flat uint8 buffers, oldest first
        self._idle_bytes = 0
        self._lock = threading.RLock()  # a finalizer may run during a GC inside take()

    @property
    def idle_bytes(self) -> int:
        """Bytes held for reuse."""
        return self._idle_bytes

    def take(self, n: int, row_bytes: int) -> torch.Tensor:
        """Uninitialised ``uint8 [n, row_bytes]``: an idle buffer of 1 to 1.25x the size
        when one is held, else a new one."""
        size = n * row_bytes
        if size < MIN_RECYCLED or size > self.max_bytes:
            return host_bytes(n, row_bytes)
        base = None
        with self._lock:
            for k in range(len(self._idle) - 1, -1, -1):
                if size <= self._idle[k].nbytes <= size + size // 4:
                    base = self._idle.pop(k)
                    self._idle_bytes -= base.nbytes
                    break
        if base is None:
            base = np.empty(size, dtype=np.uint8)
        view = base[:size].reshape(n, row_bytes)
        weakref.finalize(view, self._give_back, base)  # runs when the last tensor over it dies
        return torch.from_numpy(view)

    def clear(self) -> None:
        """Free the idle buffers."""
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            while self._idle and self._idle_bytes + base.nbytes > self.max_bytes:
                self._idle_bytes -= self._idle.pop(0).nbytes
            self._idle.append(base)
            self._idle_bytes += base.nbytes
