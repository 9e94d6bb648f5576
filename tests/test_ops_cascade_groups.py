"""shared_prefix_groups: the grouping that saves the most shared-block reads."""

from __future__ import annotations

import itertools
import random

import pytest

from pagedkv.ops import shared_prefix_groups


def _saving(groups, tables, lens, bs, min_shared=1):
    """Block reads a grouping saves, checked against the tables (the brute force's measure)."""
    seen = set()
    total = 0
    for rows, d in groups:
        assert len(rows) >= 2 and d >= min_shared and not seen & set(rows)
        seen |= set(rows)
        for r in rows:
            assert d <= min(len(tables[r]), lens[r] // bs), "shares blocks a row does not hold"
            assert list(tables[r][:d]) == list(tables[rows[0]][:d]), "rows do not share"
        total += (len(rows) - 1) * d
    return total


def _best(tables, lens, bs, min_shared=1):
    """Exhaustive optimum over all set partitions (small batches only)."""
    n = len(tables)
    caps = [tuple(t[: min(len(t), m // bs)]) for t, m in zip(tables, lens)]

    def lcp(rows):
        keys = [caps[r] for r in rows]
        d = 0
        while all(len(k) > d for k in keys) and len({k[d] for k in keys}) == 1:
            d += 1
        return d

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            yield [[first], *part]
            for i in range(len(part)):
                yield part[:i] + [[first, *part[i]]] + part[i + 1 :]

    best = 0
    for part in partitions(list(range(n))):
        val = 0
        for blk in part:
            d = lcp(blk) if len(blk) > 1 else 0
            if d >= min_shared:
                val += (len(blk) - 1) * d
        best = max(best, val)
    return best


def test_one_prompt_and_an_outlier():
    bs = 4
    system = list(range(100, 164))  # 64 shared blocks
    tables = [system + [200 + i] for i in range(6)]
    tables.append(system[:1] + [300, 301])  # shares only the first block
    tables.append([400, 401])  # unrelated
    lens = [len(t) * bs - 1 for t in tables]  # last block partial
    groups = shared_prefix_groups(tables, lens, bs)
    assert groups == [([0, 1, 2, 3, 4, 5], 64)], "the outlier must not cut the group to 1 block"
    assert shared_prefix_groups(tables, lens, bs, min_shared_blocks=65) == []


def test_partial_and_unheld_blocks_are_not_shared():
    bs = 4
    tables = [[1, 2, 3], [1, 2, 3], [1, 2, 9]]
    # row 1 holds only 9 tokens: its third block is partial (a fork before copy-on-write)
    assert shared_prefix_groups(tables, [12, 9, 12], bs) == [([0, 1, 2], 2)]
    assert shared_prefix_groups(tables, [12, 12, 12], bs) == [([0, 1, 2], 2)]  # 4 saved > 3
    deep = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 9]]
    assert shared_prefix_groups(deep, [20, 20, 12], bs) == [([0, 1], 5)]  # 5 saved > 4
    assert shared_prefix_groups([[1], [1]], [3, 3], bs) == []  # no full block
    with pytest.raises(ValueError, match="one per row"):
        shared_prefix_groups(tables, [1], bs)
    with pytest.raises(ValueError, match="block_size"):
        shared_prefix_groups(tables, [1, 1, 1], 0)


def test_nested_prefixes_export_rows_to_a_shallower_group():
    """A pair deep in the trie stays together while its sibling pair joins the parent."""
    base = [1, 2, 3, 4]
    deep = base + [5, 6, 7] + list(range(50, 63))  # a, b: 20 blocks
    mid = base + [5, 6, 7, 8]  # x, y: 8 blocks; C = a, b, x, y at depth 7
    tables = [deep, deep, mid, mid, base + [90], base + [91]]
    lens = [len(r) * 16 for r in tables]
    groups = shared_prefix_groups(tables, lens, 16)
    assert _saving(groups, tables, lens, 16) == _best(tables, lens, 16) == 32
    assert sorted(groups) == [([0, 1], 20), ([2, 3, 4, 5], 4)]


@pytest.mark.parametrize("min_shared", [1, 3])
def test_random_batches_reach_the_optimum(min_shared):
    rng = random.Random(1234 + min_shared)
    bs = 2
    for _ in range(60):
        n = rng.randint(1, 7)
        roots = [[rng.randint(0, 3) for _ in range(rng.randint(0, 6))] for _ in range(3)]
        tables = []
        for _ in range(n):
            r = rng.choice(roots)
            cut = rng.randint(0, len(r))
            tables.append(r[:cut] + [rng.randint(10, 12) for _ in range(rng.randint(0, 3))])
        lens = [max(0, len(t) * bs - rng.randint(0, 2)) for t in tables]
        groups = shared_prefix_groups(tables, lens, bs, min_shared_blocks=min_shared)
        got = _saving(groups, tables, lens, bs, min_shared)
        assert got == _best(tables, lens, bs, min_shared), (tables, lens, groups)


def test_large_batch_is_grouped_quickly():
    import time

    rng = random.Random(5)
    prompts = [list(range(p * 1000, p * 1000 + 64)) for p in range(4)]
    tables = [rng.choice(prompts) + [10**6 + i, 10**6 + i + 1] for i in range(256)]
    lens = [len(t) * 16 - 3 for t in tables]
    t0 = time.perf_counter()
    groups = shared_prefix_groups(tables, lens, 16)
    dt = time.perf_counter() - t0
    assert sorted(d for _, d in groups) == [64] * 4 and sum(len(r) for r, _ in groups) == 256
    assert sorted(itertools.chain(*[r for r, _ in groups])) == list(range(256))
    assert dt < 1.0, f"{dt:.3f} s for 256 rows"  # generous: a loaded 2-core box
