"""Which sequence a KVCacheGroup's rebalance moves next: a pure choice over block counts."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence


def next_move(
    used: Mapping[str, int],
    size: Mapping[str, int],
    candidates: Sequence[tuple[Hashable, str, int]],
    spread: float,
) -> tuple[Hashable, str, str] | None:
    """``(seq_id, fullest, emptiest)`` for the next move, or ``None`` when done.

    ``used`` / ``size``: blocks in use / blocks per member, in member order;
    ``candidates``: ``(seq_id, member, blocks)`` of the sequences that may move, oldest
    first. The fullest member (highest used fraction; ties: first) sends to the emptiest
    (ties: first) the sequence whose block count brings the two fractions closest; only
    one that narrows their gap, ties to the oldest. ``None`` when the gap is within
    ``spread`` or no candidate narrows it.
    """
    names = list(used)
    frac = {n: used[n] / size[n] for n in names}
    hi = max(names, key=lambda n: (frac[n], -names.index(n)))
    lo = min(names, key=lambda n: (frac[n], names.index(n)))
    gap = frac[hi] - frac[lo]
    if gap <= spread:
        return None
    best, best_gap = None, gap
    for seq_id, member, blocks in candidates:
        if member != hi:
            continue
        after = abs((used[hi] - blocks) / size[hi] - (used[lo] + blocks) / size[lo])
        if after < best_gap:
            best, best_gap = seq_id, after
    return None if best is None else (best, hi, lo)
