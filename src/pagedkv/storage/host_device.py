"""Blocks between a CPU KVPool and a CUDA KVPool (routes ``h2d`` and ``d2h``), three ways.

- ``kernel`` (the CPU pool's pages are locked and mapped, :func:`~pagedkv.storage.cudart.
  device_view`): one copy kernel on the GPU reads the source blocks and writes the target
  blocks, one side being host memory it reaches over the bus (zero copy): 1 GiB of
  scattered 2 MiB blocks on the H200 moved at 92-94 % of a contiguous pinned copy, both
  ways. It runs on the GPU's SMs, beside whatever else runs there.
- ``direct`` (the CPU pool's pages are locked, :class:`~pagedkv.storage.cudart.PageLock`):
  one ``cudaMemcpy2DAsync`` per run of blocks that are consecutive in both pools moves the
  run's ``2 L`` (layer, K/V) segments from pool to pool on the copy engine: no staging
  buffer, no kernel, no pass over host memory; the SMs stay free (80 % (d2h) and 89 %
  (h2d) of a pinned copy in the measurement above: the copy engine pays per segment).
- ``host`` (a pageable CPU pool): :class:`~pagedkv.storage.host_threads.HostThreads`
  gather a chunk into pinned rows while earlier chunks are copied to the device and
  scattered there (h2d); or the device gathers chunks and copies them into pinned rows,
  up to two chunks ahead, while the host threads scatter the one that has landed (d2h).
  Gather, copy and scatter run on streams of their own, so the copy engine does not wait
  for the kernels; :data:`DEPTH` rows of pinned staging, two device buffers.

Both are synchronous and ordered after the device's current stream (see
:mod:`pagedkv.storage.pool_copy`).
"""

from __future__ import annotations

import torch

from pagedkv import ops
from pagedkv.ops.blocks import copy_blocks_across
from pagedkv.storage import cudart
from pagedkv.storage._streams import blocks, event, finish, ids_on, side_stream
from pagedkv.storage.host_threads import HostThreads
from pagedkv.storage.pool import KVPool

DEPTH = 3  # pinned staging rows: the host works on one chunk while two are in flight


def _lock_refusal(cpu: KVPool) -> str | None:
    """Why the CPU pool cannot be copied to or from without staging: no CUDA runtime, or
    its pages are not locked (``None``: they are)."""
    if cudart.runtime() is None:
        return "the CUDA runtime library (libcudart) could not be loaded"
    if not cudart.is_page_locked(cpu.kv):
        return (
            f"the CPU pool ({cpu.nbytes} bytes) is not page-locked: lock it with "
            "KVCacheGroup(..., pin_host=True) or storage.cudart.PageLock"
        )
    return None


def direct_refusal(cpu: KVPool, gpu: KVPool) -> str | None:
    """Why blocks cannot move directly between ``cpu`` and ``gpu`` (``None``: they can)."""
    refusal = _lock_refusal(cpu)
    if refusal is not None:
        return refusal
    rt = cudart.runtime()
    assert rt is not None  # _lock_refusal checked
    limit, seg = rt.max_pitch(gpu.device.index), _segment(cpu)
    for pool in (cpu, gpu):
        if pool.num_blocks * seg > limit:
            return (
                f"{pool!r} spaces a block's segments {pool.num_blocks * seg} bytes apart, "
                f"more than the {limit} a pitched copy allows"
            )
    return None


def kernel_refusal(cpu: KVPool, gpu: KVPool) -> str | None:
    """Why a copy kernel cannot move blocks between ``cpu`` and ``gpu`` (``None``: it can).
    The pitch limit of :func:`direct_refusal` does not apply: the kernel indexes the pools
    itself, so pools of any size qualify."""
    refusal = _lock_refusal(cpu)
    if refusal is not None:
        return refusal
    rt = cudart.runtime()
    assert rt is not None  # _lock_refusal checked
    if rt.device_pointer(cpu.kv.data_ptr()) is None:  # the view itself: made by the copy
        return "the CPU pool's locked pages have no device mapping (locked without it)"
    return None


def copy(
    src: KVPool,
    s: list[int],
    dst: KVPool,
    d: list[int],
    per: int,
    staging: str,
    host: HostThreads | None,
) -> None:
    """Blocks ``s`` of ``src`` into blocks ``d`` of ``dst``, one a CPU pool and the other a
    CUDA pool (either way)."""
    to_device = src.device.type == "cpu"
    if staging == "kernel":
        _kernel(src, s, dst, d, dst.device if to_device else src.device)
        return
    if staging == "direct":
        _direct(src, s, dst, d, dst.device if to_device else src.device)
        return
    assert host is not None  # copy_blocks_between() makes threads for host staging
    (_staged_h2d if to_device else _staged_d2h)(src, s, dst, d, per, host)


def runs(s: list[int], d: list[int]) -> list[tuple[int, int, int]]:
    """``(first source, first target, length)`` of the maximal runs in which both id
    lists count up by one."""
    out: list[tuple[int, int, int]] = []
    for a, b in zip(s, d):
        if out and (a, b) == (out[-1][0] + out[-1][2], out[-1][1] + out[-1][2]):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((a, b, 1))
    return out


def _segment(pool: KVPool) -> int:
    """Bytes of one block's K (or V) of one layer: one contiguous piece of the pool."""
    return pool.layout.bytes_per_block // (2 * pool.layout.num_layers)


def _direct(src: KVPool, s: list[int], dst: KVPool, d: list[int], dev: torch.device) -> None:
    rt = cudart.runtime()
    assert rt is not None  # staging_for chose "direct" only with a runtime
    seg, planes = _segment(src), 2 * src.layout.num_layers
    # the pool [L, 2, N, ...] is [2L, N, seg] bytes: plane p of block b at (p * N + b) * seg
    s_ptr, s_pitch = src.kv.data_ptr(), src.num_blocks * seg
    d_ptr, d_pitch = dst.kv.data_ptr(), dst.num_blocks * seg
    st, cur = side_stream(dev)
    try:
        with torch.cuda.device(dev):
            handle = st.cuda_stream
            for a, b, n in runs(s, d):  # n blocks: 2L rows of n segments each
                dst_at, src_at = d_ptr + b * seg, s_ptr + a * seg
                rt.memcpy_2d(dst_at, d_pitch, src_at, s_pitch, n * seg, planes, handle)
    finally:
        finish([st], [cur])


def _kernel(src: KVPool, s: list[int], dst: KVPool, d: list[int], dev: torch.device) -> None:
    cpu, gpu = (src, dst) if src.device.type == "cpu" else (dst, src)
    view = cudart.device_view(cpu.kv, dev)
    assert view is not None  # staging_for chose "kernel" only with a mapping
    a, b = (view, gpu.kv) if cpu is src else (gpu.kv, view)
    st, cur = side_stream(dev)
    try:
        with torch.cuda.device(dev), torch.cuda.stream(st):
            copy_blocks_across(a, ids_on(s, dev), b, ids_on(d, dev), backend=gpu.backend)
    finally:
        finish([st], [cur])


def _pinned(k: int, bpb: int, count: int) -> list[torch.Tensor]:
    return [torch.empty((k, bpb), dtype=torch.uint8, pin_memory=True) for _ in range(count)]


def _staged_h2d(
    src: KVPool, s: list[int], dst: KVPool, d: list[int], per: int, host: HostThreads
) -> None:
    dev, n, bpb = dst.device, len(s), src.layout.bytes_per_block
    k_max, starts = min(per, n), range(0, n, per)
    copy_s, cur = side_stream(dev)
    scatter_s, _ = side_stream(dev)
    try:
        ring = _pinned(k_max, bpb, min(DEPTH, len(starts)))
        sent: list = [None] * len(ring)  # fires when ring[j] has reached the device
        scattered: list = [None, None]  # fires when staged[m] has been scattered
        with torch.cuda.device(dev), torch.cuda.stream(scatter_s):
            staged = [torch.empty((k_max, bpb), dtype=torch.uint8, device=dev) for _ in (0, 1)]
            d_t = ids_on(d, dev)
        for i, a in enumerate(starts):
            j, m, k = i % len(ring), i % 2, min(per, n - a)
            if sent[j] is not None:
                sent[j].synchronize()
            host.gather(src, s[a : a + k], ring[j][:k])  # while earlier chunks travel
            with torch.cuda.device(dev):
                with torch.cuda.stream(copy_s):
                    if scattered[m] is not None:
                        copy_s.wait_event(scattered[m])
                    staged[m][:k].copy_(ring[j][:k], non_blocking=True)
                    sent[j] = event(copy_s)
                with torch.cuda.stream(scatter_s):
                    scatter_s.wait_event(sent[j])
                    ops.scatter_blocks(
                        dst.kv, d_t[a : a + k], blocks(staged[m], dst, k), backend=dst.backend
                    )
                    scattered[m] = event(scatter_s)
    finally:
        finish([copy_s, scatter_s], [cur])


def _staged_d2h(
    src: KVPool, s: list[int], dst: KVPool, d: list[int], per: int, host: HostThreads
) -> None:
    dev, n, bpb = src.device, len(s), src.layout.bytes_per_block
    k_max, starts = min(per, n), list(range(0, n, per))
    gather_s, cur = side_stream(dev)
    copy_s, _ = side_stream(dev)
    try:
        ring = _pinned(k_max, bpb, min(DEPTH, len(starts)))
        landed: list = [None] * len(ring)  # fires when ring[j] holds its chunk
        copied: list = [None, None]  # fires when staged[m] has left for the host
        with torch.cuda.device(dev), torch.cuda.stream(gather_s):
            staged = [torch.empty((k_max, bpb), dtype=torch.uint8, device=dev) for _ in (0, 1)]
            s_t = ids_on(s, dev)

        def issue(i: int) -> None:  # gather chunk i on the device, copy it into its ring row
            a, j, m = starts[i], i % len(ring), i % 2
            k = min(per, n - a)
            with torch.cuda.device(dev):
                with torch.cuda.stream(gather_s):
                    if copied[m] is not None:
                        gather_s.wait_event(copied[m])
                    out = blocks(staged[m], src, k)
                    ops.gather_blocks(src.kv, s_t[a : a + k], out=out, backend=src.backend)
                    gathered = event(gather_s)
                with torch.cuda.stream(copy_s):
                    copy_s.wait_event(gathered)
                    ring[j][:k].copy_(staged[m][:k], non_blocking=True)
                    landed[j] = copied[m] = event(copy_s)

        ahead = max(1, len(ring) - 1)  # chunks in flight while the host scatters one
        for i in range(min(ahead, len(starts))):
            issue(i)
        for i, a in enumerate(starts):
            if i + ahead < len(starts):
                issue(i + ahead)  # into the ring row the host scattered last round
            j, k = i % len(ring), min(per, n - a)
            landed[j].synchronize()
            host.scatter(dst, d[a : a + k], ring[j][:k])
    finally:
        finish([gather_s, copy_s], [cur])
