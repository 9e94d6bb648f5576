"""KVCache's own checks: does it fit before it allocates, and does its state agree after;
its fingerprint (the identity of its KV bytes).

Kept apart from :mod:`pagedkv.cache` as the manager keeps its audit in
:mod:`pagedkv.manager.integrity`. The cache hands its tables over as arguments;
nothing here reads another object's private state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

from pagedkv import _resources
from pagedkv._kv_formats import dtype_name
from pagedkv.manager import BlockManager, ManagerConfig
from pagedkv.storage import KVLayout, KVPool
from pagedkv.tiers import CPUTier, TieredStore

if TYPE_CHECKING:
    import torch


def check_fits(
    layout: KVLayout,
    num_blocks: int,
    device: torch.device,
    tiers: object,
    config: ManagerConfig,
    side_pools: Sequence[tuple[KVLayout, int]] = (),
) -> None:
    """Raise :class:`~pagedkv.errors.ResourceError` if the cache cannot fit this machine.

    The pool (and the compressed side pools, ``side_pools``: (layout, num_blocks)) go on
    ``device``; the block bookkeeping, the CPU tiers' slabs and pools on the CPU all come
    out of the same host memory, so they are added up.
    """
    bookkeeping = config.bookkeeping_bytes(num_blocks, layout.block_size)
    pool = KVPool.bytes_needed(layout, num_blocks)
    for lay, n in side_pools:
        bookkeeping += config.bookkeeping_bytes(n, lay.block_size)
        pool += KVPool.bytes_needed(lay, n)
    cpu_tiers = 0
    if isinstance(tiers, (list, tuple)):
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


def violations(
    manager: BlockManager,
    pool: KVPool,
    tiers: TieredStore | None,
    swapped: Mapping[Hashable, object],
    salts: Mapping[Hashable, object],
    evicted: Sequence[tuple[int, bytes]],
) -> list[str]:
    """What disagrees between the cache's parts (the manager and tiers check themselves):
    its swapped-out sequences, recorded salts and evictions not yet demoted."""
    problems = []
    both = [sid for sid in swapped if sid in manager]
    if both:
        problems.append(f"sequences {both[:5]} are both resident and swapped out")
    if tiers is None and swapped:
        problems.append(f"{len(swapped)} sequences are swapped out but there are no tiers")
    if tiers is not None:
        held = tiers.stats()["swapped_sequences"]
        if held != len(swapped):
            problems.append(
                f"the tiers hold {held} swapped-out sequences, the cache lists {len(swapped)}"
            )
    live = set(manager.seq_ids())
    if set(salts) != live:
        stray = [s for s in salts if s not in live][:5]
        missing = [s for s in live if s not in salts][:5]
        problems.append(f"salts recorded for dead sequences {stray} / missing for {missing}")
    if pool.num_blocks != manager.num_blocks:
        problems.append(f"pool has {pool.num_blocks} blocks, manager {manager.num_blocks}")
    if evicted:
        problems.append(f"{len(evicted)} evicted blocks were never demoted to the tiers")
    return problems


def fingerprint(layout: KVLayout, model_fingerprint: str) -> str:
    """Identity of the KV bytes: the layout (its storage format too) and the model that
    produced them."""
    desc = (
        f"L{layout.num_layers}-H{layout.num_kv_heads}-D{layout.head_dim}"
        f"-B{layout.block_size}-{str(layout.dtype).removeprefix('torch.')}"
    )
    if layout.quantized:  # unquantized layouts keep the fingerprint they always had
        desc += f"-kv_{dtype_name(layout.kv_dtype)}-{layout.kv_scale}"
    digest = hashlib.sha256(f"{desc}|{model_fingerprint}".encode()).hexdigest()[:16]
    return f"{desc}-{digest}"
