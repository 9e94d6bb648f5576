"""Sliding-window releases beside the limits: private sequences, share_prefix, a forced
reset, allocate_released's counters and privacy, seq_stats of what is held."""

from __future__ import annotations

import pytest

from pagedkv import BlockManager

BS = 4
TOKS = list(range(1, 15))  # 3 full blocks and 2 tokens


def test_a_private_sequence_releases_its_blocks_as_free():
    m = BlockManager(8, BS)
    m.allocate("p", TOKS, share_prefix=False)
    assert m.release_before("p", 8) == 2
    s = m.stats()
    assert (s.cached_blocks, s.used_blocks, s.free_blocks) == (0, 2, 6)
    assert m.lookup(TOKS) == 0
    st = m.seq_stats("p")
    assert (st.blocks, st.tokens, st.utilization) == (2, 14, 6 / 8)
    m.check_integrity()
    m.free("p")
    assert m.stats().cached_blocks == 0
    m.check_integrity()


def test_share_prefix_of_a_released_sequence_keeps_its_placeholders():
    m = BlockManager(12, BS)
    m.allocate("a", TOKS)
    m.release_before("a", 8)  # blocks 0 and 1 go back to the cache
    with pytest.raises(ValueError, match="released its blocks"):
        m.share_prefix("a", "b", 7)  # b would hold a released block's tokens
    with pytest.raises(ValueError, match="released its blocks"):
        m.share_prefix("a", "b", 8)  # ... or nothing at all
    m.check_integrity()
    m.share_prefix("a", "b", 10)  # block 2's first two tokens: copied
    assert m.num_released("b") == 2 and m.block_table("b")[:2] == [0, 0]
    assert m.take_copies() == [(m.block_table("a")[2], m.block_table("b")[2])]
    m.share_prefix("a", "c", 12)  # whole blocks: block 2 is shared
    assert m.block_table("c")[2] == m.block_table("a")[2]
    assert m.seq_stats("c").shared_blocks == 1
    m.check_integrity()
    for sid in "abc":
        m.free(sid)
    m.check_integrity()


def test_a_forced_reset_skips_the_placeholders():
    m = BlockManager(8, BS)
    m.allocate("a", TOKS)
    m.release_before("a", 8)
    m.allocate("z", [9, 9, 9, 9, 1])  # may hold block 0 for real
    assert m.reset_prefix_cache(force=True)
    m.check_integrity()
    m.free("a")
    m.free("z")
    assert m.stats().cached_blocks == 0
    m.check_integrity()


def test_allocate_released_counts_and_can_be_private():
    m = BlockManager(8, BS)
    m.allocate_released("w", TOKS, 2)
    m.allocate_released("p", TOKS, 2, share_prefix=False)
    s = m.stats()
    assert (s.requests_without_hit, s.query_tokens) == (2, 28)
    assert not m.shares_prefix("p") and m.shares_prefix("w")
    assert m.block_hashes("p") == []
    with pytest.raises(TypeError, match="share_prefix"):
        m.allocate_released("q", TOKS, 2, share_prefix="no")
    m.check_integrity()
    m.free("p")
    m.free("w")
    assert m.stats().cached_blocks == 1  # w's registered full block 2; p's none
    m.check_integrity()
