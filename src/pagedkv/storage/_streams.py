"""Small helpers the pool-to-pool copies share: side streams, events, id tensors, views."""

from __future__ import annotations

import torch

from pagedkv.storage.pool import KVPool


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values, dtype)`` on ``device`` without waiting for it: on CUDA
    through pinned memory, copied on the current stream (``torch.tensor(..., device=
    "cuda")`` copies from pageable memory and synchronizes the stream, which would stall
    the host on work still running)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def ids_on(ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as int64 on ``device``, copied on the current stream without a sync."""
    return to_device(ids, device, torch.int64)


def blocks(t: torch.Tensor, pool: KVPool, k: int) -> torch.Tensor:
    """The first ``k`` rows of a uint8 ``[n, bytes_per_block]`` buffer as block tensors."""
    lay = pool.layout
    shape = (k, lay.num_layers, 2, lay.block_size, lay.num_kv_heads, lay.head_dim)
    return t[:k].view(lay.dtype).view(shape)


def event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    done = torch.cuda.Event()
    done.record(stream)
    return done


def side_stream(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(a new stream on ``device`` that starts after its current stream, that stream)."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(current)
    return stream, current


def finish(streams: list[torch.cuda.Stream], currents: list[torch.cuda.Stream]) -> None:
    """Wait for our streams (also after an error: nothing of ours may still write), and
    order the callers' current streams after them."""
    for stream in streams:
        stream.synchronize()
    for current in currents:
        for stream in streams:
            if stream.device == current.device:
                current.wait_stream(stream)
