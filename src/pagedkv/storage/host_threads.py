"""HostThreads: whole blocks between a CPU KVPool and byte rows (or another CPU pool), copied
by several threads.

A block of a pool ``[L, 2, num_blocks, block_size, Hkv, D]`` is ``2 L`` segments, one per
(layer, K/V) plane, ``num_blocks`` segments apart. One thread copying them (pageable pool
<-> pinned staging rows) runs at a few GB/s, far below a PCIe link; a few threads
together reach the memory bandwidth. Each thread copies an equal share of the
(block, plane) segments with numpy, which releases the GIL during the copy and runs on
the calling thread only (a torch copy inside a worker would start an OpenMP team of its
own per call, and the teams of several workers would oversubscribe the cores).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import torch

from pagedkv._closing import Closing
from pagedkv.storage.pool import KVPool

THREAD_NAME = "pagedkv-host-copy"
MAX_DEFAULT_THREADS = 8  # memory-bound copies: more threads than this add little


def default_threads() -> int:
    """Threads a host copy uses unless told: the cores this process may run on, at most
    :data:`MAX_DEFAULT_THREADS`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_DEFAULT_THREADS, cores or 1))


class HostThreads(Closing):
    """``threads`` threads that gather blocks of CPU pools into rows and scatter rows back.

    The calling thread does one share itself, so ``threads=1`` starts no thread and
    ``threads=n`` starts ``n - 1`` workers, on first use. :meth:`close` joins them; a later
    copy starts them again. A copy returns (or raises) only once every share of it has
    finished, so no worker still writes when it does. Use from one thread at a time.
    """

    def __init__(self, threads: int) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise TypeError(f"threads must be an int, got {type(threads).__name__}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.thread_name = f"{THREAD_NAME}-{id(self):x}"  # its workers: <thread_name>_<i>
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HostThreads(threads={self.threads}, running={self.running})"

    def workers(self) -> list[threading.Thread]:
        """The worker threads alive now."""
        mine = self.thread_name + "_"
        return [t for t in threading.enumerate() if t.name.startswith(mine)]

    @property
    def running(self) -> bool:
        """Whether worker threads are up (they start on the first copy that needs them)."""
        return self._pool is not None

    def gather(self, pool: KVPool, block_ids: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        """Bytes of blocks ``block_ids`` of the CPU ``pool`` into ``out`` (uint8
        ``[n, bytes_per_block]``, CPU, contiguous), each row ordered as
        :meth:`KVPool.read_blocks` orders it; returns ``out``."""
        ids = self._check(pool, block_ids, out, "out")
        self._run(_planes(pool), ids, _rows(pool, out), list(range(len(ids))))
        return out

    def scatter(self, pool: KVPool, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """Exact inverse of :meth:`gather`: ``rows`` into the distinct blocks ``block_ids``."""
        ids = self._check(pool, block_ids, rows, "rows")
        if len(set(ids)) != len(ids):
            twice = next(b for b in ids if ids.count(b) > 1)
            raise ValueError(f"block_ids must be distinct (block {twice} appears twice)")
        self._run(_rows(pool, rows), list(range(len(ids))), _planes(pool), ids)

    def copy(self, src: KVPool, src_ids: Sequence[int], dst: KVPool, dst_ids: Sequence[int]):
        """Blocks ``src_ids[i]`` of the CPU pool ``src`` into blocks ``dst_ids[i]`` of the CPU
        pool ``dst`` (same layout, distinct targets, not the same pool), bit-exact."""
        if not isinstance(dst, KVPool) or not isinstance(src, KVPool) or src is dst:
            raise ValueError("copy() takes two distinct KVPools")
        if src.layout != dst.layout:
            raise ValueError(f"pool layouts differ: {src.layout} vs {dst.layout}")
        s = self._check(src, src_ids, None, "")
        d = self._check(dst, dst_ids, None, "")
        if len(s) != len(d) or len(set(d)) != len(d):
            raise ValueError("dst_ids must be distinct and as many as src_ids")
        self._run(_planes(src), s, _planes(dst), d)

    def close(self) -> None:
        """Join the worker threads (idempotent; the next copy starts new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _check(self, pool: KVPool, block_ids: Sequence[int], t: torch.Tensor | None, name: str):
        if not isinstance(pool, KVPool) or pool.device.type != "cpu":
            where = f" on {pool.device}" if isinstance(pool, KVPool) else ""
            raise ValueError(f"pool must be a KVPool on the CPU, got {type(pool).__name__}{where}")
        ids = [int(b) for b in block_ids]
        bad = [b for b in ids if not 0 <= b < pool.num_blocks]
        if bad:
            raise ValueError(f"block id {bad[0]} out of range [0, {pool.num_blocks})")
        if t is None:
            return ids
        shape = (len(ids), pool.layout.bytes_per_block)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be a uint8 tensor of shape {list(shape)}")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor")
        return ids

    def _run(self, src: np.ndarray, s: list[int], dst: np.ndarray, d: list[int]) -> None:
        total = len(s) * src.shape[0]
        shares = _shares(total, max(1, min(self.threads, total)))
        futures: list[Future] = []
        if len(shares) > 1:
            workers = self._workers()
            futures = [workers.submit(_copy, src, s, dst, d, share) for share in shares[1:]]
        try:
            _copy(src, s, dst, d, shares[0])
        finally:
            wait(futures)  # even when our own share failed: nobody writes after we return
        for f in futures:
            f.result()  # the first worker error, if any

    def _workers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.threads - 1, thread_name_prefix=self.thread_name
                )
            return self._pool


def _planes(pool: KVPool) -> np.ndarray:
    """The pool as bytes ``[2 L, num_blocks, segment]`` (a view)."""
    lay = pool.layout
    return pool.kv.view(torch.uint8).view(lay.num_layers * 2, pool.num_blocks, -1).numpy()


def _rows(pool: KVPool, t: torch.Tensor) -> np.ndarray:
    """Rows ``[n, bytes_per_block]`` as planes ``[2 L, n, segment]`` (a view): row ``i`` is
    block ``i`` of a pool of ``n`` blocks."""
    return t.numpy().reshape(t.shape[0], pool.layout.num_layers * 2, -1).transpose(1, 0, 2)


def _shares(total: int, n: int) -> list[tuple[int, int]]:
    """``[0, total)`` cut into ``n`` near-equal ranges (none empty when ``total >= n``)."""
    cuts = [total * i // n for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(0, 0)]


def _copy(src: np.ndarray, s: list[int], dst: np.ndarray, d: list[int], share) -> None:
    """Copy segments ``share`` (flat index ``i * 2L + plane``) of blocks ``s[i]`` of ``src``
    into blocks ``d[i]`` of ``dst``, both planes ``[2L, blocks, segment]``."""
    first, stop = share
    per = src.shape[0]
    while first < stop:
        i, p = divmod(first, per)
        q = min(per, p + stop - first)
        np.copyto(dst[p:q, d[i]], src[p:q, s[i]])
        first += q - p
