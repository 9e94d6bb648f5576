"""Which rows of a batch should share a cascade group: pure Python over block ids.

Sequences that share a cached chain have the same physical block ids at the start of
their block tables (the block manager hands out one block per distinct full-block
prefix), so the grouping follows from the tables alone. Each row may join one group;
a group of n rows sharing d blocks saves ``(n - 1) * d`` block reads per layer. The
best grouping is not always "longest common prefix of everyone with the same first
block": one outlier that shares only the first block would cut the whole group to one
block. :func:`shared_prefix_groups` maximises the saving exactly over the trie of
block-id prefixes (sorted tables, adjacent common prefixes, one DP pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

NO_GROUP = 0  # the depth passed down when no ancestor forms a group


@dataclass
class _Node:
    depth: int  # shared blocks of every row below
    children: list = field(default_factory=list)  # _Node or a row index (int)


def _lcp(a: tuple, b: tuple, guess: int) -> int:
    """Common prefix length of a and b; ``guess`` (the previous pair's) is usually right."""
    n = min(len(a), len(b))
    if guess <= n and a[:guess] == b[:guess] and (guess == n or a[guess] != b[guess]):
        return guess
    lo, hi = 0, n  # a[:lo] == b[:lo], and the answer is <= hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _trie(items: list[tuple[tuple, int]]) -> _Node:
    """The tree of common-prefix intervals of sorted (key, row) items (leaves: rows)."""
    root = _Node(0)
    stack = [root]
    guess = 0
    for i, (key, row) in enumerate(items):
        if i:
            guess = lcp = _lcp(items[i - 1][0], key, guess)
            last = None
            while stack[-1].depth > lcp:
                last = stack.pop()
                if stack[-1].depth >= lcp:
                    stack[-1].children.append(last)
                    last = None
            if stack[-1].depth < lcp:
                node = _Node(lcp, [last if last is not None else stack[-1].children.pop()])
                stack.append(node)
        stack[-1].children.append(row)
    while len(stack) > 1:
        node = stack.pop()
        stack[-1].children.append(node)
    return root


def shared_prefix_groups(
    block_tables: Sequence[Sequence[int]],
    num_tokens: Sequence[int],
    block_size: int,
    *,
    min_shared_blocks: int = 1,
) -> list[tuple[list[int], int]]:
    """Groups ``[(rows, shared_blocks), ...]`` for :class:`pagedkv.ops.CascadePlan`.

    ``block_tables[b]``: row b's block ids (host ints, e.g. the manager's block tables);
    ``num_tokens[b]``: the tokens of row b that may be shared (decode: its length;
    prefill: its cached length ``seq_len - q_len``): only its first
    ``num_tokens[b] // block_size`` blocks, full ones, are candidates. Returns groups of
    two or more rows, each sharing at least ``min_shared_blocks`` blocks, maximising the
    block reads saved, ``sum((len(rows) - 1) * shared_blocks)``. O(B log B) comparisons.
    """
    if len(block_tables) != len(num_tokens):
        raise ValueError(
            f"{len(block_tables)} block tables but {len(num_tokens)} lengths; one per row"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(min_shared_blocks, bool) or not isinstance(min_shared_blocks, int):
        raise TypeError(f"min_shared_blocks must be an int, got {min_shared_blocks!r}")
    min_shared = max(1, min_shared_blocks)
    items = []
    for b, (table, n) in enumerate(zip(block_tables, num_tokens)):
        cap = min(len(table), int(n) // block_size)
        if cap >= min_shared:
            items.append((tuple(table[:cap]), b))
    items.sort()
    root = _trie(items)
    # Post-order DP. value(v, a): best saving below v when its rows may join an ancestor
    # group of depth a (each row earns a; NO_GROUP earns nothing). At v: no group
    # (children keep a) or a group at v (children join it, the group pays depth once).
    order, parents, stack = [], {}, [root]
    while stack:
        v = stack.pop()
        order.append(v)
        for c in v.children:
            if isinstance(c, _Node):
                parents[id(c)] = v
                stack.append(c)
    cands: dict[int, list[int]] = {id(root): [NO_GROUP]}
    for v in order[1:]:
        p = parents[id(v)]
        up = cands[id(p)] + ([p.depth] if p is not root and p.depth >= min_shared else [])
        cands[id(v)] = up
    value: dict[int, dict[int, int]] = {}
    grouped: dict[int, int | None] = {}  # id(v) -> the value of grouping at v, or None

    def val(c, a: int) -> int:
        return a if not isinstance(c, _Node) else value[id(c)][a]

    for v in reversed(order):
        here = None
        if v is not root and v.depth >= min_shared:
            here = sum(val(c, v.depth) for c in v.children) - v.depth
        grouped[id(v)] = here
        value[id(v)] = {}
        for a in cands[id(v)]:
            plain = sum(val(c, a) for c in v.children)
            value[id(v)][a] = plain if here is None else max(plain, here)
    groups: list[tuple[list[int], int]] = []
    # (node, ancestor group depth, that group's rows)
    todo: list[tuple[_Node, int, list[int] | None]] = [(root, NO_GROUP, None)]
    while todo:
        v, a, members = todo.pop()
        here = grouped[id(v)]
        if here is not None and here > sum(val(c, a) for c in v.children):
            members = []
            groups.append((members, v.depth))
            a = v.depth
        for c in v.children:
            if isinstance(c, _Node):
                todo.append((c, a, members))
            elif members is not None:
                members.append(c)
    return [(sorted(rows), d) for rows, d in groups if len(rows) >= 2]
