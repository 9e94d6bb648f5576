"""Transfer: whole blocks between a KVPool and host rows, in chunks, stream-ordered on CUDA.

On CUDA a gather runs on a side copy stream into pinned rows and records an event;
the current stream waits for that event, so a kernel that overwrites the blocks
afterwards (the evicting allocation's prefill) cannot overtake the copy, and a host
reader synchronizes on the event before touching the rows. Blocks move in chunks
of about ``chunk_bytes``: the pool stages a whole batch on the device, and swapping
a long sequence must not need gigabytes of device memory at a moment of pressure.

Tiers may store another format than the pool (``CPUTier(..., kv_dtype="fp8")``):
:meth:`Transfer.gather_encoded` converts each chunk on the pool's device before it is
copied out (the host sees half the bytes), :meth:`Transfer.scatter_decoded` converts
after the copy in.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext as _nullcontext
from typing import Any

import torch

from pagedkv import _tensor_checks
from pagedkv.storage import KVLayout, KVPool, convert_rows

CHUNK_BYTES = 256 << 20


class Transfer:
    """Copies between ``pool`` and host ``uint8 [n, bytes_per_block]`` rows."""

    def __init__(
        self, pool: KVPool, chunk_bytes: int = CHUNK_BYTES, tier_layout: KVLayout | None = None
    ) -> None:
        self.pool = pool
        self.bytes_per_block = pool.layout.bytes_per_block
        # the tiers' format, when it is not the pool's (None: rows are the pool's bytes)
        self.encoded = None if tier_layout in (None, pool.layout) else tier_layout
        self.chunk = max(1, chunk_bytes // self.bytes_per_block)  # blocks per copy
        self.cuda = pool.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=pool.device) if self.cuda else None

    def host_rows(self, n: int) -> torch.Tensor:
        """Uninitialised host rows for ``n`` blocks (pinned on CUDA, recycled on CPU)."""
        return self.pool.host_rows(n)

    def gather(self, block_ids: Sequence[int]) -> tuple[torch.Tensor, Any]:
        """Copy blocks to new host rows; returns ``(rows, event)``, ``event`` ``None`` on CPU.

        On CUDA the rows are valid once ``event`` has completed.
        """
        ids, n, step, pool = list(block_ids), len(block_ids), self.chunk, self.pool
        if self._stream is None:
            rows = self.host_rows(n)
            for a in range(0, n, step):
                pool.read_blocks(ids[a : a + step], out=rows[a : a + step])
            return rows, None
        current = torch.cuda.current_stream(pool.device)
        self._stream.wait_stream(current)  # see the pool as the current stream left it
        with torch.cuda.stream(self._stream):
            rows = self.host_rows(n)
            for a in range(0, n, step):
                pool.read_blocks(ids[a : a + step], out=rows[a : a + step], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        current.wait_event(event)  # a later write into these blocks cannot overtake the copy
        return rows, event

    def gather_ready(self, block_ids: Sequence[int]) -> torch.Tensor:
        """:meth:`gather_encoded` (rows in the tiers' format), waiting until the rows hold
        the bytes."""
        rows, event = self.gather_encoded(block_ids)
        if event is not None:
            event.synchronize()
        return rows

    def scatter(
        self,
        block_ids: Sequence[int],
        rows: torch.Tensor,
        *,
        after: torch.cuda.Event | None = None,
    ) -> None:
        """Write host rows into pool blocks on the current stream (async from pinned rows;
        torch's pinned allocator keeps them alive until the copy has run). ``after``: the
        event of the :meth:`gather` that filled ``rows``, if the current stream may not
        have waited for it (a different stream than at gather time)."""
        if after is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(after)
        ids, step = list(block_ids), self.chunk
        for a in range(0, len(ids), step):
            self.pool.write_blocks(ids[a : a + step], rows[a : a + step], non_blocking=self.cuda)

    # -- in the tiers' format -------------------------------------------------------------

    def tier_rows(self, n: int) -> torch.Tensor:
        """Uninitialised host rows for ``n`` blocks in the tiers' format."""
        if self.encoded is None:
            return self.host_rows(n)
        return torch.empty((n, self.encoded.bytes_per_block), dtype=torch.uint8,
                           pin_memory=self.cuda)  # fmt: skip

    def gather_encoded(self, block_ids: Sequence[int]) -> tuple[torch.Tensor, Any]:
        """:meth:`gather`, the rows converted to the tiers' format (on the pool's device)."""
        if self.encoded is None:
            return self.gather(block_ids)
        pool, lay, n, step = self.pool, self.encoded, len(block_ids), self.chunk
        ids = _tensor_checks.block_ids(list(block_ids), pool.num_blocks, pool.device, "block_ids")
        out = self.tier_rows(n)
        stream = self._stream
        if stream is not None:
            current = torch.cuda.current_stream(pool.device)
            stream.wait_stream(current)
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            for a in range(0, n, step):
                part = ids[a : a + step]
                staged = torch.empty((part.numel(), self.bytes_per_block), dtype=torch.uint8,
                                     device=pool.device)  # fmt: skip
                pool.gather_rows(part, staged)
                conv = convert_rows(staged, pool.layout, lay)
                out[a : a + part.numel()].copy_(conv, non_blocking=self.cuda)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        if event is not None:
            current.wait_event(event)
        return out, event

    def scatter_decoded(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """:meth:`scatter` of rows in the tiers' format (converted on the pool's device)."""
        if self.encoded is None:
            self.scatter(block_ids, rows)
            return
        ids, step, pool = list(block_ids), self.chunk, self.pool
        for a in range(0, len(ids), step):
            part = rows[a : a + step].to(pool.device, non_blocking=self.cuda)
            pool.write_blocks(ids[a : a + step], convert_rows(part, self.encoded, pool.layout))
