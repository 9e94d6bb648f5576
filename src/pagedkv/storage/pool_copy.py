"""Whole blocks from one KVPool into another: on another device, or another pool on the same.

The route depends on the two devices (:attr:`BlockCopy.route`):

- ``host``: both pools on the CPU; one strided copy per block, pool to pool.
- ``device``: two pools on one CUDA device; a gather, then a scatter, on a side stream.
- ``peer``: CUDA to another CUDA device; a gather on the source, one device-to-device copy
  (peer to peer when the GPUs can access each other, else staged by the driver), a scatter
  on the target. Gather, copy and scatter run on streams of their own, so chunk i's copy
  overlaps the gather of chunk i+1 and the scatter of chunk i-1.
- ``h2d``: CPU to CUDA; the host gathers a chunk into pinned rows while the previous chunk
  is copied to the device and scattered there.
- ``d2h``: CUDA to CPU; a gather and a copy into pinned rows on the device while the host
  scatters the previous chunk.
- ``staged``: any other pair; through host rows (:meth:`KVPool.read_blocks` /
  :meth:`KVPool.write_blocks`).

Blocks move in chunks of about ``chunk_bytes`` (two staging buffers per side at most), so
moving a long sequence never needs its size in spare device memory. The copy is
synchronous: when it returns (or raises) no copy of it is still running, and the target
device's current stream is ordered after the writes. Work the callers' current streams
queued before the call (a kernel still writing source blocks, or reading target blocks)
runs before the copy touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pagedkv.storage.pool import KVPool

CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class BlockCopy:
    """What :func:`copy_blocks_between` did: its route, blocks, bytes and whether the two
    GPUs could access each other directly (``None`` unless the route is ``peer``)."""

    route: str
    blocks: int
    bytes: int
    peer: bool | None = None


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


def copy_blocks_between(
    src: KVPool,
    src_ids: Sequence[int],
    dst: KVPool,
    dst_ids: Sequence[int],
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> BlockCopy:
    """Copy blocks ``src_ids[i]`` of ``src`` into blocks ``dst_ids[i]`` of ``dst``, bit-exact.

    Both pools must have the same layout and be distinct; ids are in range, ``dst_ids``
    distinct. Arguments are checked before any byte moves (``TypeError``/``ValueError``).
    """
    _check(src, src_ids, dst, dst_ids, chunk_bytes)
    s, d = [int(b) for b in src_ids], [int(b) for b in dst_ids]
    how = route(src.device, dst.device)
    peer = peer_access(src.device, dst.device)
    done = BlockCopy(how, len(s), len(s) * src.layout.bytes_per_block, peer)
    if not s:
        return done
    per = max(1, chunk_bytes // src.layout.bytes_per_block)
    _ROUTES[how](src, s, dst, d, per)
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


# -- routes: (src, src ids, dst, dst ids, blocks per chunk) -> None ----------------------


def _copy_host(src: KVPool, s: list[int], dst: KVPool, d: list[int], per: int) -> None:
    skv, dkv = src.kv, dst.kv
    for a, b in zip(s, d):  # [L, 2, block_size, Hkv, D] each; torch splits it over threads
        dkv[:, :, b].copy_(skv[:, :, a])
    if src.scales is not None:  # a block's scales travel with it
        dst.scales[:, :, d] = src.scales[:, :, s]


def _copy_staged(src: KVPool, s: list[int], dst: KVPool, d: list[int], per: int) -> None:
    for a in range(0, len(s), per):
        dst.write_blocks(d[a : a + per], src.read_blocks(s[a : a + per]))


def _ids(ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as int64 on ``device``, copied on the current stream without a sync."""
    return torch.tensor(ids, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def _event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _finish(streams: list[torch.cuda.Stream], currents: list[torch.cuda.Stream]) -> None:
    """Wait for our streams (also after an error: nothing of ours may still write), and
    order the callers' current streams after them."""
    for stream in streams:
        stream.synchronize()
    for current in currents:
        for stream in streams:
            if stream.device == current.device:
                current.wait_stream(stream)


def _side_stream(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(a new stream on ``device`` that starts after its current stream, that stream)."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(current)
    return stream, current


def _copy_device(src: KVPool, s: list[int], dst: KVPool, d: list[int], per: int) -> None:
    dev = src.device
    st, cur = _side_stream(dev)
    try:
        with torch.cuda.device(dev), torch.cuda.stream(st):
            s_t, d_t = _ids(s, dev), _ids(d, dev)
            k_max = min(per, len(s))
            staged = torch.empty((k_max, src.layout.bytes_per_block), dtype=torch.uint8, device=dev)
            for a in range(0, len(s), per):
                k = min(per, len(s) - a)
                src.gather_rows(s_t[a : a + k], staged[:k])
                dst.scatter_rows(d_t[a : a + k], staged[:k])
    finally:
        _finish([st], [cur])


def _copy_peer(src: KVPool, s: list[int], dst: KVPool, d: list[int], per: int) -> None:
    a_dev, b_dev = src.device, dst.device
    gather_s, cur_a = _side_stream(a_dev)
    send_s, _ = _side_stream(a_dev)
    recv_s, cur_b = _side_stream(b_dev)
    scatter_s, _ = _side_stream(b_dev)
    n, bpb = len(s), src.layout.bytes_per_block
    k_max = min(per, n)
    try:
        with torch.cuda.device(a_dev), torch.cuda.stream(gather_s):
            a_buf = [torch.empty((k_max, bpb), dtype=torch.uint8, device=a_dev) for _ in (0, 1)]
            s_t = _ids(s, a_dev)
        with torch.cuda.device(b_dev), torch.cuda.stream(scatter_s):
            b_buf = [torch.empty((k_max, bpb), dtype=torch.uint8, device=b_dev) for _ in (0, 1)]
            d_t = _ids(d, b_dev)
        gathered, sent, received, scattered = [None, None], [None, None], [None, None], [None, None]
        for i, a in enumerate(range(0, n, per)):
            j, k = i % 2, min(per, n - a)
            with torch.cuda.device(a_dev), torch.cuda.stream(gather_s):
                if sent[j] is not None:
                    gather_s.wait_event(sent[j])  # a_buf[j] has left for the target
                src.gather_rows(s_t[a : a + k], a_buf[j][:k])
                gathered[j] = _event(gather_s)
            # torch issues a cross-device copy on the source's current stream, fenced with
            # the target's current stream; the events below order it either way.
            with torch.cuda.stream(send_s), torch.cuda.stream(recv_s):
                send_s.wait_event(gathered[j])
                if scattered[j] is not None:  # b_buf[j] has been scattered
                    send_s.wait_event(scattered[j])
                    recv_s.wait_event(scattered[j])
                b_buf[j][:k].copy_(a_buf[j][:k], non_blocking=True)
                sent[j], received[j] = _event(send_s), _event(recv_s)
            with torch.cuda.device(b_dev), torch.cuda.stream(scatter_s):
                scatter_s.wait_event(sent[j])
                scatter_s.wait_event(received[j])
                dst.scatter_rows(d_t[a : a + k], b_buf[j][:k])
                scattered[j] = _event(scatter_s)
    finally:
        _finish([gather_s, send_s, recv_s, scatter_s], [cur_a, cur_b])


def _copy_h2d(src: KVPool, s: list[int], dst: KVPool, d: list[int], per: int) -> None:
    dev, n, bpb = dst.device, len(s), src.layout.bytes_per_block
    k_max = min(per, n)
    st, cur = _side_stream(dev)
    try:
        pinned = [torch.empty((k_max, bpb), dtype=torch.uint8, pin_memory=True) for _ in (0, 1)]
        copied: list = [None, None]
        with torch.cuda.device(dev), torch.cuda.stream(st):
            staged = torch.empty((k_max, bpb), dtype=torch.uint8, device=dev)
            d_t = _ids(d, dev)
            for i, a in enumerate(range(0, n, per)):
                j, k = i % 2, min(per, n - a)
                if copied[j] is not None:
                    copied[j].synchronize()  # pinned[j] has reached the device
                src.read_blocks(s[a : a + k], out=pinned[j][:k])  # the host gathers meanwhile
                staged[:k].copy_(pinned[j][:k], non_blocking=True)
                copied[j] = _event(st)
                dst.scatter_rows(d_t[a : a + k], staged[:k])
    finally:
        _finish([st], [cur])


def _copy_d2h(src: KVPool, s: list[int], dst: KVPool, d: list[int], per: int) -> None:
    dev, n, bpb = src.device, len(s), src.layout.bytes_per_block
    k_max = min(per, n)
    st, cur = _side_stream(dev)
    starts = list(range(0, n, per))
    try:
        pinned = [torch.empty((k_max, bpb), dtype=torch.uint8, pin_memory=True) for _ in (0, 1)]
        landed: list = [None, None]
        with torch.cuda.device(dev), torch.cuda.stream(st):
            staged = torch.empty((k_max, bpb), dtype=torch.uint8, device=dev)
            s_t = _ids(s, dev)

        def issue(i: int) -> None:  # gather chunk i and copy it into pinned[i % 2]
            a, j = starts[i], i % 2
            k = min(per, n - a)
            with torch.cuda.device(dev), torch.cuda.stream(st):
                src.gather_rows(s_t[a : a + k], staged[:k])
                pinned[j][:k].copy_(staged[:k], non_blocking=True)
                landed[j] = _event(st)

        issue(0)
        for i, a in enumerate(starts):
            if i + 1 < len(starts):
                issue(i + 1)  # pinned[(i + 1) % 2] was scattered in the previous round
            j, k = i % 2, min(per, n - a)
            landed[j].synchronize()
            dst.write_blocks(d[a : a + k], pinned[j][:k])  # the host scatters meanwhile
    finally:
        _finish([st], [cur])


_ROUTES: dict[str, Callable[[KVPool, list[int], KVPool, list[int], int], None]] = {
    "host": _copy_host,
    "device": _copy_device,
    "peer": _copy_peer,
    "h2d": _copy_h2d,
    "d2h": _copy_d2h,
    "staged": _copy_staged,
}
