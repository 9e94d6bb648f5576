"""Named results of :class:`~pagedkv.group.KVCacheGroup`: moves and per-member statistics."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from pagedkv.manager import CacheStats


@dataclass(frozen=True)
class MoveResult:
    """One sequence moved between members of a group.

    ``blocks_copied`` blocks (``bytes_copied`` bytes) went from ``source`` to ``target``;
    ``blocks_reused`` leading blocks were already on the target (its prefix cache, or
    loaded back from its tiers) and were not copied. ``route`` is how the bytes travelled
    (:func:`pagedkv.storage.pool_copy.route`); ``peer`` says whether two GPUs accessed each
    other directly (``None`` unless both members are on distinct GPUs); ``staging`` how a
    move between a CPU and a CUDA member went (``"kernel"``: a copy kernel through the
    CPU pool's device mapping; ``"direct"``: pitched copies between the pools on the copy
    engine; ``"host"``: host threads through pinned rows; ``None`` for other routes).
    ``seconds`` covers the whole move: bookkeeping on both sides and the copy.
    """

    seq_id: Hashable
    source: str
    target: str
    blocks_copied: int
    blocks_reused: int
    bytes_copied: int
    seconds: float
    route: str
    peer: bool | None
    staging: str | None = None


@dataclass(frozen=True)
class DeviceStats:
    """One member of a group: its cache's :class:`CacheStats`, bytes, and the group's
    counters for it.

    ``bytes_used`` counts blocks in use (``cache.used_blocks``); ``used_fraction`` is
    ``used_blocks / num_blocks``, the quantity :meth:`KVCacheGroup.rebalance` evens out.
    ``placements`` counts sequences the group's ``allocate`` put here, ``prefix_hits``
    those of them that found a cached prefix here (``prefix_hit_tokens`` tokens in all).
    ``moves_in`` / ``moves_out`` count moves; ``blocks_copied_in`` / ``blocks_reused_in``
    the blocks moves into this member copied or found already here. ``page_locked``:
    whether the member's pool is page-locked CPU memory (copied directly to GPUs).
    """

    name: str
    device: str
    cache: CacheStats
    bytes_used: int
    bytes_total: int
    used_fraction: float
    sequences: int
    placements: int
    prefix_hits: int
    prefix_hit_tokens: int
    moves_in: int
    moves_out: int
    blocks_copied_in: int
    blocks_reused_in: int
    page_locked: bool = False


@dataclass
class Counters:
    """The group's running counters for one member (see :class:`DeviceStats`)."""

    placements: int = 0
    prefix_hits: int = 0
    prefix_hit_tokens: int = 0
    moves_in: int = 0
    moves_out: int = 0
    blocks_copied_in: int = 0
    blocks_reused_in: int = 0
