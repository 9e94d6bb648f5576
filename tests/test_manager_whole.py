"""What zero-compute repeats need of the manager: ``allocate(whole=True)`` reuses the
last full block too, ``prompt_match`` names the cached KV of a whole prompt, and
``discard(written=)`` keeps the blocks whose KV was written before a failed step."""

from __future__ import annotations

import pytest

from pagedkv import BlockManager
from pagedkv.manager import PromptMatch

BS = 4


def state(m: BlockManager) -> tuple:
    return (m.stats(), m.seq_ids(), m.num_free_blocks, sorted(m.eviction_order()))


def test_whole_reuses_every_full_block():
    m = BlockManager(16, BS)
    p = list(range(8))  # two full blocks
    m.allocate("a", p)
    blocks = m.block_table("a")
    m.free("a")
    assert m.allocate("b", p) == 4  # one token (a block) always left to compute
    m.free("b")
    assert m.allocate("c", p, whole=True) == 8 and m.block_table("c") == blocks
    assert m.allocate("d", p + [9, 9], whole=True) == 8  # + one fresh block for the rest
    assert m.block_table("d")[:2] == blocks and len(m.block_table("d")) == 3
    m.append("c", [5])  # the next token goes to a new block
    assert len(m.block_table("c")) == 3
    m.check_integrity()
    assert m.stats().hit_tokens == 4 + 8 + 8


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_bad_whole_raises_and_changes_nothing(bad):
    m = BlockManager(16, BS)
    m.allocate("a", list(range(8)))
    before = state(m)
    with pytest.raises(TypeError, match="whole must be"):
        m.allocate("b", list(range(8)), whole=bad)
    assert state(m) == before


def test_prompt_match_names_the_cached_kv_of_a_whole_prompt():
    m = BlockManager(16, BS)
    p = list(range(10))  # two full blocks and two tokens
    assert m.prompt_match(p) is None  # nothing cached
    m.allocate("a", p)
    match = m.prompt_match(p)
    assert isinstance(match, PromptMatch) and len(match.registrations) == 2
    hashes = m.hash_blocks(p)
    assert m.prompt_match(p[:8]).key == hashes[-1]  # aligned: the last block's chain hash
    assert match.key not in (hashes[-1], m.prompt_match(p[:9]).key)  # the tail counts
    assert m.prompt_match(p, salt="t") is None  # another namespace
    assert m.prompt_match([7, 7]).registrations == ()  # no full block: nothing to check
    m.free("a")
    assert m.prompt_match(p) == match  # cached, not in use: the same registrations
    m.evict(1)  # the least recently used of the two
    assert m.prompt_match(p) is None
    m.allocate("b", p)  # computed and registered again
    again = m.prompt_match(p)
    assert again.key == match.key and again.registrations != match.registrations
    m.check_integrity()


def test_prompt_match_is_none_for_prompts_that_are_never_shared():
    assert BlockManager(16, BS, prefix_caching=False).prompt_match(list(range(8))) is None
    m = BlockManager(16, BS, min_prefix_tokens=12)
    m.allocate("a", list(range(12)))
    assert m.prompt_match(list(range(12))) is not None
    assert m.prompt_match(list(range(8))) is None  # shorter than min_prefix_tokens


def test_discard_written_keeps_the_blocks_written_before():
    m = BlockManager(16, BS)
    p = list(range(7))
    m.allocate("a", p)  # block 0 full (registered), block 1 holds 3 tokens
    m.append("a", [50])  # block 1 becomes full: registered, its KV not written yet
    table = m.block_table("a")
    m.discard("a", written=7)
    assert m.lookup(p + [50, 1]) == 4  # block 0 stays cached, block 1 is not findable
    assert table[0] in m.eviction_order() and table[1] not in m.eviction_order()
    assert m.num_free_blocks == 16
    m.check_integrity()


@pytest.mark.parametrize(("bad", "exc"), [(-1, ValueError), ("3", TypeError), (1.5, TypeError)])
def test_a_bad_written_raises_and_changes_nothing(bad, exc):
    m = BlockManager(16, BS)
    m.allocate("a", list(range(9)))
    before = state(m)
    with pytest.raises(exc, match="written"):
        m.discard("a", written=bad)
    assert state(m) == before
