"""KVCache's own checks: does it fit before it allocates, and does its state agree after.

Kept apart from :mod:`pagedkv.cache` as the manager keeps its audit in
:mod:`pagedkv.manager.integrity`; both read the cache's private state on purpose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv import _resources
from pagedkv.manager import BlockManager
from pagedkv.storage import KVLayout, KVPool

if TYPE_CHECKING:
    import torch

    from pagedkv.cache import KVCache


def check_fits(
    layout: KVLayout,
    num_blocks: int,
    device: torch.device,
    tiers: object,
    manager_options: dict[str, object],
) -> None:
    """Raise :class:`~pagedkv.errors.ResourceError` if the cache cannot fit this machine.

    The pool goes on ``device``; the block bookkeeping, the CPU tiers' slabs and a pool
    on the CPU all come out of the same host memory, so they are added up.
    """
    bookkeeping = BlockManager.bookkeeping_bytes(
        num_blocks,
        layout.block_size,
        prefix_caching=bool(manager_options.get("prefix_caching", True)),
        hash_algo=manager_options.get("hash_algo", "sha256"),  # type: ignore[arg-type]
    )
    pool = KVPool.bytes_needed(layout, num_blocks)
    cpu_tiers = 0
    if isinstance(tiers, (list, tuple)):
        from pagedkv.tiers import CPUTier

        cpu_tiers = sum(t.capacity_bytes for t in tiers if isinstance(t, CPUTier))
    on_host = device.type == "cpu"
    if not on_host:
        _resources.require_memory(
            "KVCache", "num_blocks", num_blocks, pool, device,
            unit_bytes=layout.bytes_per_block, detail=f"{layout.bytes_per_block} bytes per block",
        )  # fmt: skip
    host = bookkeeping + cpu_tiers + (pool if on_host else 0)
    parts = [f"block bookkeeping {_resources.format_bytes(bookkeeping)}"]
    if on_host:
        parts.insert(0, f"pool {_resources.format_bytes(pool)}")
    if cpu_tiers:
        parts.append(f"CPU tiers {_resources.format_bytes(cpu_tiers)}")
    _resources.require_memory(
        "KVCache", "num_blocks", num_blocks, host, "cpu",
        unit_bytes=(host - cpu_tiers) // num_blocks, reserved=cpu_tiers, detail=" + ".join(parts),
    )  # fmt: skip


def violations(cache: KVCache) -> list[str]:
    """What disagrees between the cache's parts (the manager and tiers check themselves)."""
    problems = []
    manager, swapped = cache.manager, cache._swapped
    both = [sid for sid in swapped if sid in manager]
    if both:
        problems.append(f"sequences {both[:5]} are both resident and swapped out")
    if cache.tiers is None and swapped:
        problems.append(f"{len(swapped)} sequences are swapped out but there are no tiers")
    if cache.tiers is not None:
        held = cache.tiers.stats()["swapped_sequences"]
        if held != len(swapped):
            problems.append(
                f"the tiers hold {held} swapped-out sequences, the cache lists {len(swapped)}"
            )
    live = set(manager.seq_ids())
    if set(cache._salts) != live:
        stray = [s for s in cache._salts if s not in live][:5]
        missing = [s for s in live if s not in cache._salts][:5]
        problems.append(f"salts recorded for dead sequences {stray} / missing for {missing}")
    if cache.pool.num_blocks != manager.num_blocks:
        problems.append(f"pool has {cache.pool.num_blocks} blocks, manager {manager.num_blocks}")
    if cache._evicted:
        problems.append(f"{len(cache._evicted)} evicted blocks were never demoted to the tiers")
    return problems
