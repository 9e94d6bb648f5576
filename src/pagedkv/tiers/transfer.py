"""Transfer: whole blocks between a KVPool and host rows, in chunks, stream-ordered on CUDA.

On CUDA a gather runs on a side copy stream into pinned rows and records an event;
the current stream waits for that event, so a kernel that overwrites the blocks
afterwards (the evicting allocation's prefill) cannot overtake the copy, and a host
reader synchronizes on the event before touching the rows. Blocks move in chunks
of about ``chunk_bytes``: the pool stages a whole batch on the device, and swapping
a long sequence must not need gigabytes of device memory at a moment of pressure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pagedkv.storage import KVPool

CHUNK_BYTES = 256 << 20


class Transfer:
    """Copies between ``pool`` and host ``uint8 [n, bytes_per_block]`` rows."""

    def __init__(self, pool: KVPool, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.pool = pool
        self.bytes_per_block = pool.layout.bytes_per_block
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
        """:meth:`gather`, waiting until the rows hold the bytes."""
        rows, event = self.gather(block_ids)
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
