"""SwapArea: host copies of swapped-out sequences, within a byte budget, never evicted.

Kept apart from the CPU tier's slab on purpose: a swap-out is then one gather and
one device-to-host copy into rows that stay as they are until swap-in, with no
second copy into slab slots, and LRU traffic from demotions can never touch them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedkv.errors import CacheIntegrityError, OutOfBlocks


class SwapArea:
    """``key -> (uint8 [n, bytes_per_block] host rows, CUDA event or None)``, holding at most
    ``capacity_bytes`` of rows. The event completes when the swap-out copy has."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._rows: dict[str, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def check_fits(self, key: str, nbytes: int) -> None:
        """Raise (``TypeError``, ``ValueError``, :class:`OutOfBlocks`) unless ``key`` can take
        ``nbytes`` more bytes; changes nothing."""
        if not isinstance(key, str):
            raise TypeError(f"swap key must be a str, got {type(key).__name__}")
        if key in self._rows:
            raise ValueError(f"a sequence is already swapped out under key {key!r}")
        free = self.capacity_bytes - self.used_bytes
        if nbytes > free:
            raise OutOfBlocks(
                f"swap_out({key!r}) needs {nbytes} bytes of CPU swap space but {free} of "
                f"{self.capacity_bytes} are free; raise CPUTier(swap_bytes=...) or swap in / "
                "free other sequences first"
            )

    def add(self, key: str, rows: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        """Hold ``rows`` under ``key`` (after :meth:`check_fits`)."""
        self._rows[key] = (rows, event)
        self.used_bytes += rows.numel()

    def get(self, key: str) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """``(rows, event)`` held under ``key``; ``KeyError`` naming it if none."""
        try:
            return self._rows[key]
        except KeyError:
            raise KeyError(f"no sequence is swapped out under key {key!r}") from None

    def check_swap_in(
        self, key: str, block_ids: Sequence[int], skip: int
    ) -> tuple[list[int], torch.Tensor, torch.cuda.Event | None]:
        """What a swap-in of ``key`` into ``block_ids`` writes, leaving the first ``skip``
        blocks alone: ``(block ids, their rows, the swap-out's event)``. Raises
        ``KeyError`` for an unknown key, ``ValueError`` for a wrong count, ``skip`` or
        repeated ids; changes nothing."""
        rows, event = self.get(key)
        if len(block_ids) != rows.shape[0]:
            raise ValueError(
                f"swap_in({key!r}): {rows.shape[0]} blocks were swapped out, "
                f"got {len(block_ids)} block ids"
            )
        if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip <= len(rows):
            raise ValueError(f"swap_in({key!r}): skip must be an int in [0, {len(rows)}]")
        ids = list(block_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"swap_in({key!r}): block ids must be distinct, got {ids}")
        return ids[skip:], rows[skip:], event

    def discard(self, key: str) -> bool:
        """Release the rows of ``key``; returns whether there were any."""
        entry = self._rows.pop(key, None)
        if entry is None:
            return False
        self.used_bytes -= entry[0].numel()
        return True

    def clear(self) -> None:
        """Release everything."""
        self._rows.clear()
        self.used_bytes = 0

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` when the byte count disagrees with the rows."""
        held = sum(rows.numel() for rows, _ in self._rows.values())
        if held != self.used_bytes or held > self.capacity_bytes:
            raise CacheIntegrityError(
                f"SwapArea: rows hold {held} bytes, counted used_bytes({self.used_bytes}), "
                f"capacity_bytes({self.capacity_bytes})"
            )
