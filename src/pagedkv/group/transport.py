"""How a KVCacheGroup's moves copy bytes: the staging of CPU<->CUDA copies, the host threads
that stage them, and the page locks on the CPU members' pools.

A CPU member's pool is ordinary pageable memory. Locking its pages once (``pin_host``)
lets a copy kernel on the GPU move blocks straight between it and a GPU pool through the
pages' device mapping (``staging="kernel"``, the fastest), or the copy engine do it
(``"direct"``, which leaves the SMs free; see :mod:`pagedkv.storage.host_device`);
without the lock, host threads stage each chunk through pinned rows (``"host"``). The
lock is the group's only effect on a member outside its API: the pages stay resident
while the group lives, and :meth:`Transport.close` (or the group being collected)
unlocks them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pagedkv.cache import KVCache
from pagedkv.errors import ResourceError
from pagedkv.storage import KVPool, cudart, pool_copy
from pagedkv.storage.host_threads import HostThreads, default_threads


class Transport:
    """The copy settings and resources of one group (see the module doc).

    Args:
        members: the group's caches by name.
        chunk_bytes: staging granularity (:func:`pool_copy.copy_blocks_between`).
        staging: ``"auto"`` (kernel where the CPU pool is page-locked and mapped, else
            direct where it is page-locked, else host threads), ``"kernel"``, ``"direct"``
            or ``"host"``.
        host_threads: threads of the host staging and of CPU<->CPU copies (``None``:
            :func:`default_threads`).
        pin_host: page-lock the CPU members' pools: ``None`` when the group also has a
            CUDA member and the CUDA runtime can be bound (a failure then only means host
            staging), ``True`` always (a failure raises), ``False`` never.

    Validates everything before locking anything; :meth:`lock` does the locking.
    """

    def __init__(
        self,
        members: Mapping[str, KVCache],
        *,
        chunk_bytes: int,
        staging: str = "auto",
        host_threads: int | None = None,
        pin_host: bool | None = None,
    ) -> None:
        if staging not in pool_copy.STAGING:
            raise ValueError(f"staging must be one of {pool_copy.STAGING}, got {staging!r}")
        if pin_host is not None and not isinstance(pin_host, bool):
            raise TypeError(f"pin_host must be None, True or False, got {pin_host!r}")
        self._cpus = [n for n, c in members.items() if c.device.type == "cpu"]
        self._gpus = [n for n, c in members.items() if c.device.type == "cuda"]
        if pin_host and not (self._cpus and self._gpus):
            raise ValueError(
                "pin_host=True page-locks CPU members for copies to CUDA members; this group "
                f"has CPU members {self._cpus} and CUDA members {self._gpus}"
            )
        if staging in ("kernel", "direct") and pin_host is False and self._cpus and self._gpus:
            raise ValueError(
                f"staging={staging!r} needs page-locked CPU pools; drop pin_host=False"
            )
        self.threads = HostThreads(default_threads() if host_threads is None else host_threads)
        self.chunk_bytes = chunk_bytes
        self.staging = staging
        self.pin_host = pin_host
        self._members = members
        self._locks: dict[str, cudart.PageLock] = {}
        self.lock_errors: dict[str, str] = {}  # member -> why its pool stayed pageable

    def lock(self) -> None:
        """Page-lock the CPU members' pools as ``pin_host`` says; with ``staging="kernel"``
        or ``"direct"`` check that every CPU<->CUDA pair can copy that way. Raises (and
        unlocks what it locked) :class:`ResourceError` when ``pin_host=True`` cannot lock a
        pool, or ``ValueError`` when the chosen copy is impossible."""
        rt = cudart.runtime() if self._cpus and self._gpus else None
        want = self.pin_host if self.pin_host is not None else rt is not None
        try:
            if want:
                self._lock_all(rt)
            if self.staging in ("kernel", "direct"):
                for c in self._cpus:
                    for g in self._gpus:
                        pool_copy.staging_for(self._pool(c), self._pool(g), self.staging)
        except BaseException:
            self.close()
            raise

    def _lock_all(self, rt: cudart.CudaRuntime | None) -> None:
        for name in self._cpus:
            pool = self._pool(name)
            try:
                if rt is None:
                    raise cudart.CudaRuntimeError(0, "the CUDA runtime (libcudart) is not loaded")
                self._locks[name] = cudart.PageLock(pool.kv, rt)
            except cudart.CudaRuntimeError as e:
                if self.pin_host:
                    raise ResourceError(
                        f"cannot page-lock member {name!r} ({pool.nbytes} bytes): {e}; pass "
                        "pin_host=None to fall back to host staging"
                    ) from e
                self.lock_errors[name] = str(e)

    def _pool(self, name: str) -> KVPool:
        return self._members[name].pool

    def copy(
        self, src: KVPool, src_ids: Sequence[int], dst: KVPool, dst_ids: Sequence[int]
    ) -> pool_copy.BlockCopy:
        """:func:`pool_copy.copy_blocks_between` with this group's settings and threads."""
        return pool_copy.copy_blocks_between(
            src, src_ids, dst, dst_ids,
            chunk_bytes=self.chunk_bytes, staging=self.staging, host=self.threads,
        )  # fmt: skip

    def page_locked(self, name: str) -> bool:
        """Whether member ``name``'s pool is page-locked now (by this group or otherwise)."""
        cache = self._members[name]
        return cache.device.type == "cpu" and cudart.is_page_locked(cache.pool.kv)

    def close(self) -> None:
        """Join the host threads and unlock the pages this group locked (idempotent)."""
        self.threads.close()
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()
