"""Which decode rows of a step share cached prefix blocks: the cascade groups.

Requests that found the same cached chain at admission hold the same physical blocks
at the start of their block tables, so :func:`pagedkv.ops.shared_prefix_groups` finds
the groups from the tables alone. A running request's table only grows by blocks of its
own (appends take fresh blocks; the engine never forks), so the grouping of a batch is
fixed by *which admissions* its rows are: it is recomputed only when that changes (a
request joins, finishes, is preempted or re-admitted), not at every step.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedkv import ops

#: cascade runs when the groups save at least this share of the step's block reads
MIN_SAVING = 0.2


class PrefixGroups:
    """The cascade grouping of decode steps, cached per batch of admissions.

    ``block_size``: tokens per block; ``max_groups``: the most groups a step keeps (those
    saving the most block reads; see :class:`pagedkv.ops.cascade_fixed.CascadeGrouping`).
    """

    def __init__(self, block_size: int, *, max_groups: int = 8) -> None:
        self.block_size = block_size
        self.max_groups = max_groups
        self.key: tuple = ()
        self.groups: list[tuple[list[int], int]] = []

    def of(self, chunks: Sequence, tables: Sequence[Sequence[int]]) -> list[tuple[list[int], int]]:
        """Groups ``[(rows, shared_blocks), ...]`` of a decode step's ``chunks`` (one token
        each, after their slots are reserved) with block tables ``tables``; empty when
        sharing would save less than :data:`MIN_SAVING` of the block reads. The result
        is kept until the rows' admissions change (:attr:`key`)."""
        key = tuple((c.req.request_id, c.req.admitted) for c in chunks)
        if key == self.key:
            return self.groups
        bs = self.block_size
        lens = [c.end for c in chunks]
        groups = ops.shared_prefix_groups(tables, lens, bs)
        groups.sort(key=lambda g: -(len(g[0]) - 1) * g[1])
        groups = groups[: self.max_groups]
        saved = sum((len(rows) - 1) * n for rows, n in groups)
        total = sum(-(-n // bs) for n in lens)
        if saved < MIN_SAVING * total:
            groups = []
        self.key, self.groups = key, groups
        return groups
