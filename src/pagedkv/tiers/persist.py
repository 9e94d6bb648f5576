"""Persisting for a warm restart: what is only in this process goes to a persistent tier.

``KVCache.close(persist=True)`` hands :meth:`TieredStore.persist
<pagedkv.tiers.TieredStore.persist>` the device's cached blocks; with them, the blocks
the in-process tiers hold (the CPU slab, which dies with the process) are written to
the first persistent tier (disk, Redis), spilling down the chain as demotions do. A
new process with the same tiers and fingerprint then finds them.

Order: newest first (the device's cached blocks from the most recently used, then the
CPU slab's entries from the most recently used), so a persist cut short (a kill, a
shutdown deadline) has written the hottest blocks, and shared prefixes before the
blocks that continue them (a prefix hit needs the leading blocks). The persistent
tier's recency is then stamped in the device's order, oldest first. When the target is
the last tier and too small for everything, only the newest that fit are written.
Nothing is moved: entries are copied and the sources stay as they were.

Crash safety: every entry is written atomically and framed (a disk entry is a temp
file renamed over its name; a Redis entry is one ``SET``; each carries a digest checked
on every read), in chunks of at most :data:`CHUNK_BYTES` of host staging, and nothing
is deleted that is not first stored elsewhere. A process killed mid-persist (SIGKILL
included) therefore leaves complete, verifiable entries and nothing else: the blocks
not written yet are only later misses, and a dead writer's temp files are removed
when the next process opens the directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from pagedkv.tiers.level import Level

log = logging.getLogger("pagedkv.tiers")

# Host staging per round of persisting (rows gathered from the device, or read from an
# in-process tier, before they are stored).
CHUNK_BYTES = 64 << 20


class Persisted(NamedTuple):
    """What a persist did: ``tier``, the name of the first persistent tier written;
    ``device_blocks``/``tier_blocks``: blocks offered from the device and from the
    in-process tiers; ``stored``: entries written (blocks the persistent tiers held
    already are not written again); ``seconds``: wall time."""

    tier: str
    device_blocks: int
    tier_blocks: int
    stored: int
    seconds: float


def persistent_level(levels: Sequence[Level]) -> int | None:
    """Index of the first level that outlives the process (not in-process), if any."""
    return next((i for i, level in enumerate(levels) if not level.in_process), None)


def check_persistent(levels: Sequence[Level]) -> None:
    """``ValueError`` unless some level outlives the process."""
    if persistent_level(levels) is None:
        raise ValueError(
            "persisting needs a DiskTier or RedisTier among the tiers; these tiers "
            f"({', '.join(level.name for level in levels)}) end with the process"
        )


def persist_blocks(
    levels: Sequence[Level],
    device: Sequence[tuple[str, int]],
    *,
    key_prefix: str,
    gather: Callable[[list[int]], torch.Tensor],
    put: Callable[[int, list[str], torch.Tensor], None],
) -> Persisted:
    """Write the ``device`` blocks (``(key, block id)``, least recently used first) and the
    in-process levels' entries (under ``key_prefix``) to the first persistent level,
    ``CHUNK_BYTES`` at a time: ``gather(ids)`` copies device blocks to host rows,
    ``put(i, keys, rows)`` stores into level ``i`` (spilling its victims below)."""
    t0 = time.perf_counter()
    check_persistent(levels)
    target = persistent_level(levels)
    assert target is not None
    level = levels[target]
    step = max(1, CHUNK_BYTES // level.bytes_per_block)
    before = sum(lv.puts for lv in levels[target:])
    # newest first: a persist cut short has written the hottest blocks (shared prefixes
    # are used last, so they are written before the blocks that continue them)
    fresh = list(reversed(dict(device).items()))  # one block per key
    in_process = [
        (lv, k) for lv in levels[:target] for k in reversed(list(lv.store.keys(key_prefix)))
    ]
    if target == len(levels) - 1 and level.capacity_blocks is not None:
        # nothing below to spill to: write no more than fits (the rest would only evict it)
        fresh = fresh[: level.capacity_blocks]
        in_process = in_process[: max(0, level.capacity_blocks - len(fresh))]
    for a in range(0, len(fresh), step):
        blocks = fresh[a : a + step]
        put(target, [k for k, _ in blocks], gather([b for _, b in blocks]))
    for a in range(0, len(in_process), step):
        entries = in_process[a : a + step]
        for source in dict.fromkeys(lv for lv, _ in entries):
            keys = [k for lv, k in entries if lv is source]
            rows = torch.empty((len(keys), level.bytes_per_block), dtype=torch.uint8)
            found = [j for j, ok in enumerate(source.load(keys, rows)) if ok]
            if found:
                put(target, [keys[j] for j in found], rows[found])
    # then the persistent tier's recency in the device's order (oldest stamped first)
    level.touch([k for _, k in reversed(in_process)] + [k for k, _ in reversed(fresh)])
    stored = sum(lv.puts for lv in levels[target:]) - before
    done = Persisted(level.name, len(fresh), len(in_process), stored, time.perf_counter() - t0)
    log.info(
        "pagedkv: persisted %d KV blocks to the %s tier (%d offered from the device, %d from "
        "in-process tiers) in %.3f s", done.stored, done.tier, done.device_blocks,
        done.tier_blocks, done.seconds,
    )  # fmt: skip
    return done
