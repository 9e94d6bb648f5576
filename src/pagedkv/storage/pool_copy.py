"""Whole blocks from one KVPool into another: on another device, or another pool on the same.

The route depends on the two devices (:attr:`BlockCopy.route`):

- ``host``: both pools on the CPU; each block's segments copied pool to pool by host
  threads (:class:`~pagedkv.storage.host_threads.HostThreads`).
- ``device``: two pools on one CUDA device; a gather, then a scatter, on a side stream.
- ``peer``: CUDA to another CUDA device; a gather on the source, one device-to-device copy
  (peer to peer when the GPUs can access each other, else staged by the driver), a scatter
  on the target. Gather, copy and scatter run on streams of their own, so chunk i's copy
  overlaps the gather of chunk i+1 and the scatter of chunk i-1.
- ``h2d`` / ``d2h``: CPU to CUDA and back, ``staging`` (:attr:`BlockCopy.staging`) says how
  (:mod:`pagedkv.storage.host_device`): ``kernel``, one copy kernel on the GPU through the
  device mapping of a page-locked CPU pool (the fastest; it uses SMs); ``direct``, pitched
  copies pool to pool on the copy engine when the CPU pool is page-locked (SMs free);
  ``host``, host threads gather (scatter) chunks of a pageable CPU pool into (out of)
  pinned rows, overlapped with the transfers. ``auto`` picks the first of these it can.
- ``staged``: any other pair, and compressed (fp8 / int8) pools, whose blocks carry their
  scales; through host rows (:meth:`KVPool.read_blocks` / :meth:`KVPool.write_blocks`).

Blocks move in chunks of about ``chunk_bytes`` where they are staged (a few staging
buffers per side at most), so moving a long sequence never needs its size in spare
device memory. The copy is synchronous: when it returns (or raises) no copy of it is
still running, and the target device's current stream is ordered after the writes. Work
the callers' current streams queued before the call (a kernel still writing source
blocks, or reading target blocks) runs before the copy touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pagedkv import ops
from pagedkv.storage import host_device
from pagedkv.storage._streams import blocks, event, finish, ids_on, side_stream
from pagedkv.storage.host_threads import HostThreads, default_threads
from pagedkv.storage.pool import KVPool

CHUNK_BYTES = 64 << 20
STAGING = ("auto", "kernel", "direct", "host")


@dataclass(frozen=True)
class BlockCopy:
    """What :func:`copy_blocks_between` did: its route, blocks and bytes; whether the two
    GPUs could access each other directly (``None`` unless the route is ``peer``); how a
    CPU<->CUDA copy went (``"kernel"``, ``"direct"`` or ``"host"``; ``None`` for the other
    routes)."""

    route: str
    blocks: int
    bytes: int
    peer: bool | None = None
    staging: str | None = None


@dataclass(frozen=True)
class Plan:
    """How a route runs: blocks per chunk, the staging of ``h2d``/``d2h`` and its threads."""

    per: int
    staging: str | None = None
    host: HostThreads | None = None


def route(src: torch.device, dst: torch.device) -> str:
    """The route blocks take from a pool on ``src`` to one on ``dst`` (see the module doc)."""
    src, dst = torch.device(src), torch.device(dst)
    if src.type == dst.type == "cpu":
        return "host"
    if src.type == dst.type == "cuda":
        return "device" if src == dst else "peer"
    if src.type == "cpu" and dst.type == "cuda":
        return "h2d"
    if src.type == "cuda" and dst.type == "cpu":
        return "d2h"
    return "staged"


def peer_access(src: torch.device, dst: torch.device) -> bool | None:
    """Whether GPU ``src`` can access GPU ``dst`` directly; ``None`` unless both are CUDA
    devices and distinct."""
    if route(src, dst) != "peer":
        return None
    return bool(torch.cuda.can_device_access_peer(src.index, dst.index))


def staging_for(src: KVPool, dst: KVPool, staging: str = "auto") -> str | None:
    """How a copy from ``src`` to ``dst`` would stage: ``"kernel"``, ``"direct"`` or
    ``"host"`` between a CPU and a CUDA pool, ``None`` otherwise. ``"kernel"`` or
    ``"direct"`` when it cannot be raises ``ValueError`` saying why; ``"auto"`` is the first
    of ``"kernel"``, ``"direct"``, ``"host"`` that is possible."""
    if staging not in STAGING:
        raise ValueError(f"staging must be one of {STAGING}, got {staging!r}")
    how = route(src.device, dst.device)
    if how not in ("h2d", "d2h"):
        return None
    if staging == "host":
        return "host"
    cpu, gpu = (src, dst) if how == "h2d" else (dst, src)
    checks = {"kernel": host_device.kernel_refusal, "direct": host_device.direct_refusal}
    for way in ("kernel", "direct") if staging == "auto" else (staging,):
        refusal = checks[way](cpu, gpu)
        if refusal is None:
            return way
        if staging != "auto":
            raise ValueError(f"staging={staging!r} is not possible: {refusal}")
    return "host"


def copy_blocks_between(
    src: KVPool,
    src_ids: Sequence[int],
    dst: KVPool,
    dst_ids: Sequence[int],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    staging: str = "auto",
    host: HostThreads | None = None,
) -> BlockCopy:
    """Copy blocks ``src_ids[i]`` of ``src`` into blocks ``dst_ids[i]`` of ``dst``, bit-exact.

    Both pools must have the same layout and be distinct; ids are in range, ``dst_ids``
    distinct. ``staging`` (``"auto"``, ``"kernel"``, ``"direct"``, ``"host"``) chooses how
    a CPU<->CUDA copy goes (see :func:`staging_for`); ``host`` are the threads that copy
    CPU pools' blocks (``"host"`` staging, CPU to CPU; default: threads started for this
    call, :func:`default_threads` of them). Arguments are checked before any byte moves
    (``TypeError``/``ValueError``).
    """
    _check(src, src_ids, dst, dst_ids, chunk_bytes)
    if host is not None and not isinstance(host, HostThreads):
        raise TypeError(f"host must be HostThreads or None, got {type(host).__name__}")
    how_staged = staging_for(src, dst, staging)
    s, d = [int(b) for b in src_ids], [int(b) for b in dst_ids]
    how = route(src.device, dst.device)
    if src.layout.quantized:
        # the other routes move the payload tensor; host rows carry a block's scales too
        how, how_staged = "staged", None
    peer = None if how == "staged" else peer_access(src.device, dst.device)
    done = BlockCopy(how, len(s), len(s) * src.layout.bytes_per_block, peer, how_staged)
    if not s:
        return done
    per = max(1, chunk_bytes // src.layout.bytes_per_block)
    own = host is None and (how_staged == "host" or how == "host")
    owned = HostThreads(default_threads()) if own else None
    try:
        _ROUTES[how](src, s, dst, d, Plan(per, how_staged, owned or host))
    finally:
        if owned is not None:
            owned.close()
    return done


def _check(src: KVPool, s: Sequence[int], dst: KVPool, d: Sequence[int], chunk: int) -> None:
    if not isinstance(src, KVPool) or not isinstance(dst, KVPool):
        raise TypeError("copy_blocks_between() copies between two KVPools")
    if src is dst:
        raise ValueError("source and target are the same pool; use KVPool.copy_blocks()")
    if src.layout != dst.layout:
        raise ValueError(f"pool layouts differ: {src.layout} vs {dst.layout}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk!r}")
    if len(s) != len(d):
        raise ValueError(f"{len(s)} source blocks but {len(d)} target blocks")
    for name, ids, pool in (("src_ids", s, src), ("dst_ids", d, dst)):
        for b in ids:
            if isinstance(b, bool) or not isinstance(b, int):
                raise TypeError(f"{name} must hold ints, got {type(b).__name__} {b!r}")
            if not 0 <= b < pool.num_blocks:
                raise ValueError(f"{name}: block {b} out of range [0, {pool.num_blocks})")
    if len(set(d)) != len(d):
        raise ValueError("dst_ids must be distinct (two blocks cannot land in one)")


# -- routes: (src, src ids, dst, dst ids, plan) -> None ----------------------------------


def _copy_host(src: KVPool, s: list[int], dst: KVPool, d: list[int], plan: Plan) -> None:
    # numpy copies on our threads: torch's per-block strided copy splits 2 MiB over an
    # OpenMP team per call, which stalls badly when the cores are busy (0.1 GB/s measured)
    assert plan.host is not None  # copy_blocks_between() makes threads for this route
    plan.host.copy(src, s, dst, d)


def _copy_staged(src: KVPool, s: list[int], dst: KVPool, d: list[int], plan: Plan) -> None:
    per = plan.per
    for a in range(0, len(s), per):
        dst.write_blocks(d[a : a + per], src.read_blocks(s[a : a + per]))


def _copy_device(src: KVPool, s: list[int], dst: KVPool, d: list[int], plan: Plan) -> None:
    dev, per = src.device, plan.per
    st, cur = side_stream(dev)
    try:
        with torch.cuda.device(dev), torch.cuda.stream(st):
            s_t, d_t = ids_on(s, dev), ids_on(d, dev)
            for a in range(0, len(s), per):
                staged = ops.gather_blocks(src.kv, s_t[a : a + per], backend=src.backend)
                ops.scatter_blocks(dst.kv, d_t[a : a + per], staged, backend=dst.backend)
    finally:
        finish([st], [cur])


def _copy_peer(src: KVPool, s: list[int], dst: KVPool, d: list[int], plan: Plan) -> None:
    a_dev, b_dev, per = src.device, dst.device, plan.per
    gather_s, cur_a = side_stream(a_dev)
    send_s, _ = side_stream(a_dev)
    recv_s, cur_b = side_stream(b_dev)
    scatter_s, _ = side_stream(b_dev)
    n, bpb = len(s), src.layout.bytes_per_block
    k_max = min(per, n)
    try:
        with torch.cuda.device(a_dev), torch.cuda.stream(gather_s):
            a_buf = [torch.empty((k_max, bpb), dtype=torch.uint8, device=a_dev) for _ in (0, 1)]
            s_t = ids_on(s, a_dev)
        with torch.cuda.device(b_dev), torch.cuda.stream(scatter_s):
            b_buf = [torch.empty((k_max, bpb), dtype=torch.uint8, device=b_dev) for _ in (0, 1)]
            d_t = ids_on(d, b_dev)
        sent: list[torch.cuda.Event | None] = [None, None]
        scattered: list[torch.cuda.Event | None] = [None, None]
        for i, a in enumerate(range(0, n, per)):
            j, k = i % 2, min(per, n - a)
            with torch.cuda.device(a_dev), torch.cuda.stream(gather_s):
                left = sent[j]
                if left is not None:
                    gather_s.wait_event(left)  # a_buf[j] has left for the target
                ops.gather_blocks(
                    src.kv, s_t[a : a + k], out=blocks(a_buf[j], src, k), backend=src.backend
                )
                gathered = event(gather_s)
            # torch issues a cross-device copy on the source's current stream, fenced with
            # the target's current stream; the events below order it either way.
            with torch.cuda.stream(send_s), torch.cuda.stream(recv_s):
                send_s.wait_event(gathered)
                done = scattered[j]
                if done is not None:  # b_buf[j] has been scattered
                    send_s.wait_event(done)
                    recv_s.wait_event(done)
                b_buf[j][:k].copy_(a_buf[j][:k], non_blocking=True)
                sent_j, received = event(send_s), event(recv_s)
                sent[j] = sent_j
            with torch.cuda.device(b_dev), torch.cuda.stream(scatter_s):
                scatter_s.wait_event(sent_j)
                scatter_s.wait_event(received)
                ops.scatter_blocks(
                    dst.kv, d_t[a : a + k], blocks(b_buf[j], dst, k), backend=dst.backend
                )
                scattered[j] = event(scatter_s)
    finally:
        finish([gather_s, send_s, recv_s, scatter_s], [cur_a, cur_b])


def _copy_host_device(src: KVPool, s: list[int], dst: KVPool, d: list[int], plan: Plan) -> None:
    assert plan.staging is not None  # staging_for() names one for every CPU/CUDA pair
    host_device.copy(src, s, dst, d, plan.per, plan.staging, plan.host)


_ROUTES: dict[str, Callable[[KVPool, list[int], KVPool, list[int], Plan], None]] = {
    "host": _copy_host,
    "device": _copy_device,
    "peer": _copy_peer,
    "h2d": _copy_host_device,
    "d2h": _copy_host_device,
    "staged": _copy_staged,
}
