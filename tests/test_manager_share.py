"""share_prefix, seq_stats and the call counters of the block manager, with exact numbers.

Block size 4; a fresh pool hands out block 0, 1, 2, ... in order.
"""

from __future__ import annotations

import pytest

from pagedkv import BlockManager, OutOfBlocks
from test_manager_errors import assert_unchanged, capture, populated

BS = 4
A = list(range(1, 15))  # 14 tokens: full blocks 0, 1, 2 and a partial block 3 (2 tokens)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- share_prefix -------------------------------------------------------------------------


def test_share_prefix_shares_full_blocks_and_copies_a_partial_one():
    m = BlockManager(16, BS)
    m.allocate("a", A)
    m.share_prefix("a", "d", 9)  # 2 full blocks + 1 token of block 2
    assert m.block_table("a") == [0, 1, 2, 3] and m.block_table("d") == [0, 1, 4]
    assert m.take_copies() == [(2, 4)]  # block 2's KV into d's own block 4
    assert m.token_ids("d") == A[:9] and m.num_tokens("d") == 9
    assert m.block_hashes("d") == m.block_hashes("a")[:2]
    m.share_prefix("a", "e", 8)  # block-aligned: nothing copied
    assert m.block_table("e") == [0, 1] and m.take_copies() == []
    m.share_prefix("a", "f", 14)  # everything: a fork, the partial block shared (CoW later)
    assert m.block_table("f") == [0, 1, 2, 3] and m.take_copies() == []
    s = m.stats()
    assert (s.used_blocks, s.cow_copies, s.num_sequences, s.blocks_allocated) == (5, 1, 4, 5)
    m.check_integrity()
    m.append("d", [10, 11, 12])  # d's block 4 fills with a's block 2 content: anonymous
    m.append("d", [77])
    assert m.block_table("d") == [0, 1, 4, 5] and m.block_hashes("d") == m.block_hashes("a")[:3]
    m.append("f", [15, 16])  # f writes into the shared partial block 3: copy-on-write
    assert m.take_copies() == [(3, 6)]
    for sid in ("a", "d", "e", "f"):
        m.free(sid)
    s = m.stats()
    # registered: a's 0, 1, 2 and f's block 6 (A + [15, 16] fills it): 4 cached
    assert (s.cached_blocks, s.free_blocks, s.used_blocks) == (4, 12, 0)
    m.check_integrity()


def test_share_prefix_cutting_a_hit_chain_holds_per_block_references():
    m = BlockManager(16, BS)
    m.allocate("a", A)
    m.free("a")  # 0, 1, 2 cached
    assert m.allocate("b", A[:12] + [50, 51]) == 12  # a chain of 3 + block 3
    m.allocate("b2", A[:12] + [60])  # the same chain, a second holder
    m.share_prefix("b", "g", 6)  # one block of the chain + 2 tokens copied
    assert m.block_table("g") == [0, 5] and m.take_copies() == [(1, 5)]
    m.share_prefix("b", "h", 13)  # past the chain: holds the chain itself
    assert m.block_table("h") == [0, 1, 2, 6] and m.take_copies() == [(3, 6)]
    assert m.seq_stats("g").shared_blocks == 1 and m.seq_stats("h").shared_blocks == 3
    m.check_integrity()
    for sid in ("b", "b2", "h"):
        m.free(sid)
        m.check_integrity()
    assert m.block_table("g") == [0, 5] and m.stats().used_blocks == 2
    m.free("g")
    assert m.stats().used_blocks == 0 and m.stats().cached_blocks == 3  # the chain 0, 1, 2
    m.check_integrity()


def test_share_prefix_of_a_private_sequence_is_private():
    m = BlockManager(16, BS)
    m.allocate("p", A, share_prefix=False)
    m.share_prefix("p", "q", 10)
    assert not m.shares_prefix("q") and m.block_hashes("q") == []
    m.take_copies()
    m.free("p")
    m.free("q")
    assert m.stats().cached_blocks == 0 and m.stats().free_blocks == 16
    m.check_integrity()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m.share_prefix("nope", "n", 4), KeyError, "unknown sequence 'nope'"),
        (lambda m: m.share_prefix("a", "a2", 4), ValueError, "already live"),
        (lambda m: m.share_prefix("a", "n", 0), ValueError, "num_tokens must be >= 1"),
        (lambda m: m.share_prefix("a", "n", 12), ValueError, "more than sequence 'a' holds"),
        (lambda m: m.share_prefix("a", "n", 4.0), TypeError, "num_tokens must be an int"),
        (lambda m: m.share_prefix("a", "n", True), TypeError, "num_tokens must be an int"),
        (lambda m: m.share_prefix("a", ["n"], 4), TypeError, "dst_id must be hashable"),
    ],
)
def test_share_prefix_refuses_bad_arguments_and_changes_nothing(call, exc, match):
    m = populated()  # "a": 11 tokens
    before = capture(m)
    with pytest.raises(exc, match=match):
        call(m)
    assert_unchanged(m, before)
    assert m.take_copies() == [] and m.stats().allocation_failures == 0


def test_share_prefix_out_of_blocks_changes_nothing_but_the_failure_count():
    m = BlockManager(4, BS)
    m.allocate("a", A + [15, 16])  # all 4 blocks
    before = capture(m)
    with pytest.raises(OutOfBlocks, match="share_prefix"):
        m.share_prefix("a", "n", 6)  # the partial block needs a copy: no block left
    assert_unchanged(m, before)
    assert m.stats().allocation_failures == 1
    m.share_prefix("a", "n", 8)  # aligned: no new block needed
    assert m.block_table("n") == [0, 1]


# ---- seq_stats ------------------------------------------------------------------------------


def test_seq_stats_exact():
    clock = FakeClock()
    m = BlockManager(16, BS, clock=clock)
    m.allocate("a", A)  # 4 blocks, 14 tokens
    clock.now = 1.0
    m.fork("a", "c")
    clock.now = 2.0
    m.allocate("b", A[:12] + [70])  # hits a's blocks 0-2 (in use: one chain)
    s = m.seq_stats("a")
    assert (s.blocks, s.shared_blocks, s.tokens, s.bytes) == (4, 4, 14, None)
    assert s.utilization == 14 / 16 and s.last_access == 0.0
    assert m.seq_stats("c").last_access == 1.0
    b = m.seq_stats("b")
    assert (b.blocks, b.shared_blocks, b.tokens, b.last_access) == (4, 3, 13, 2.0)
    clock.now = 3.0
    m.append("b", [71, 72])  # into b's block 3 (15 of 16 slots): not stamped
    assert m.seq_stats("b").last_access == 2.0
    m.append("b", [73, 74])  # 17 tokens: a new block, stamped
    assert m.seq_stats("b").last_access == 3.0 and m.seq_stats("b").blocks == 5
    m.free("a")
    m.free("c")
    b = m.seq_stats("b")  # the chain is b's alone now
    assert (b.shared_blocks, b.utilization) == (0, 17 / 20)
    with pytest.raises(KeyError, match="unknown sequence 'a'"):
        m.seq_stats("a")


def test_a_chain_shared_by_two_holders_counts_as_shared():
    m = BlockManager(16, BS)
    m.allocate("a", A)
    m.free("a")
    m.allocate("x", A[:12] + [1])
    assert m.seq_stats("x").shared_blocks == 0  # the chain has one holder
    m.allocate("y", A[:12] + [2])
    assert m.seq_stats("x").shared_blocks == 3 == m.seq_stats("y").shared_blocks


# ---- counters -------------------------------------------------------------------------------


def test_call_counters_exact():
    m = BlockManager(10, BS)
    m.allocate("a", A)  # no hit
    m.allocate("b", A[:9])  # hits 2 blocks
    m.allocate("p", A[:9], share_prefix=False)  # private: no hit
    m.fork("a", "a2")
    with pytest.raises(OutOfBlocks):
        m.allocate("big", list(range(100, 120)))
    with pytest.raises(OutOfBlocks):
        m.append("p", [0] * 20)
    m.free("a2")
    m.discard("p")
    with pytest.raises(KeyError):
        m.free("p")  # a failed free is not a deallocation
    s = m.stats()
    assert (s.requests_with_hit, s.requests_without_hit) == (1, 2)
    assert (s.allocation_failures, s.deallocations) == (2, 2)
    assert (s.query_tokens, s.hit_tokens) == (14 + 9 + 9, 8)
    m.check_integrity()


def test_share_prefix_ending_at_a_hit_chain_holds_per_block_references():
    m = BlockManager(16, BS)
    m.allocate("a", A[:4] + [5])
    m.free("a")  # block 0 cached
    assert m.allocate("b", A[:4] + [9]) == 4  # b: a hit chain of 1 block + 1 token
    m.share_prefix("b", "d", 4)  # exactly the chain: no token past it
    assert m.block_table("d") == [0] and m.seq_stats("b").shared_blocks == 1
    m.check_integrity()
    m.free("b")
    m.free("d")
    assert m.stats().cached_blocks == 1 and m.stats().used_blocks == 0
    m.check_integrity()
