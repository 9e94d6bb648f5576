"""KVCache sequence ids: live, swapped out or unknown, each entry point refuses the wrong kind.

An id that is swapped out must not be forked into, allocated, appended to or read as
if live; a live id must not be swapped in. Each refusal raises a clear error and
changes nothing (the swapped-out sequence still comes back bit-exact). A state
machine then drives random operations over a few ids through every entry point.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pagedkv import KVCache, KVLayout, OutOfBlocks
from pagedkv.tiers import CPUTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32)


def new_cache(num_blocks: int = 16) -> KVCache:
    return KVCache(LAYOUT, num_blocks, tiers=[CPUTier(64 * LAYOUT.bytes_per_block)])


def fill_random(cache: KVCache, seq_id) -> None:
    table = cache.block_table(seq_id)
    data = torch.randint(0, 256, (len(table), LAYOUT.bytes_per_block), dtype=torch.uint8)
    cache.write_blocks(table, data)


def state(cache: KVCache) -> tuple:
    """Everything a refused call must leave as it was (a refusal for space counts itself
    in ``allocation_failures``, and only there)."""
    seqs = {s: (cache.token_ids(s), cache.block_table(s), cache.salt(s)) for s in cache.seq_ids()}
    return (
        seqs,
        cache.swapped_ids(),
        dataclasses.replace(cache.stats(), allocation_failures=0),
        cache.tier_stats()["swapped_sequences"],
        cache.manager.eviction_order(),
        cache.pool.kv.view(torch.uint8).clone(),  # bytes: random bits include NaNs
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[:-1] == after[:-1]
    assert torch.equal(before[-1], after[-1])


@pytest.fixture
def parked():
    """'a' live, 's' swapped out (its bytes kept to compare after swap_in)."""
    cache = new_cache()
    cache.allocate("a", list(range(10)), salt="t")
    fill_random(cache, "a")
    cache.allocate("s", list(range(20, 31)), salt="u")
    fill_random(cache, "s")
    s_bytes = cache.read_blocks(cache.block_table("s")).clone()
    cache.swap_out("s")
    yield cache, s_bytes
    cache.close()


SWAPPED_MISUSE = [
    pytest.param(lambda c: c.fork("a", "s"), ValueError, "swapped out", id="fork-into-swapped"),
    pytest.param(lambda c: c.fork("s", "n"), KeyError, "swapped out", id="fork-from-swapped"),
    pytest.param(lambda c: c.allocate("s", [1, 2]), ValueError, "swapped out", id="allocate"),
    pytest.param(lambda c: c.append("s", [1]), KeyError, "swapped out", id="append"),
    pytest.param(lambda c: c.swap_out("s"), KeyError, "swapped out", id="swap-out-twice"),
    pytest.param(lambda c: c.block_table("s"), KeyError, "swapped out", id="block-table"),
    pytest.param(lambda c: c.slot_mapping("s"), KeyError, "swapped out", id="slot-mapping"),
    pytest.param(lambda c: c.num_tokens("s"), KeyError, "swapped out", id="num-tokens"),
    pytest.param(lambda c: c.token_ids("s"), KeyError, "swapped out", id="token-ids"),
    pytest.param(lambda c: c.salt("s"), KeyError, "swapped out", id="salt"),
    pytest.param(lambda c: c.block_tables_tensor(["a", "s"]), KeyError, "swapped out",
                 id="block-tables-tensor"),
    pytest.param(lambda c: c.swap_in("a"), KeyError, "it is live", id="swap-in-live"),
    pytest.param(lambda c: c.swap_in("zz"), KeyError, "it is unknown", id="swap-in-unknown"),
    pytest.param(lambda c: c.fork("a", "a"), ValueError, "already live", id="fork-into-live"),
    pytest.param(lambda c: c.allocate("a", [1]), ValueError, "already live", id="allocate-live"),
    pytest.param(lambda c: c.fork("zz", "n"), KeyError, "unknown sequence", id="fork-unknown"),
    pytest.param(lambda c: c.allocate(["x"], [1]), TypeError, "seq_id must be hashable",
                 id="allocate-unhashable"),
    pytest.param(lambda c: c.fork("a", ["x"]), TypeError, "child_id must be hashable",
                 id="fork-unhashable-child"),
    pytest.param(lambda c: c.free(["x"]), TypeError, "seq_id must be hashable",
                 id="free-unhashable"),
    pytest.param(lambda c: c.swap_in(["x"]), TypeError, "seq_id must be hashable",
                 id="swap-in-unhashable"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "exc", "message"), SWAPPED_MISUSE)
def test_misused_id_is_refused_and_nothing_changes(parked, call, exc, message):
    cache, s_bytes = parked
    before = state(cache)
    with pytest.raises(exc, match=message):
        call(cache)
    assert_same(before, state(cache))
    cache.check_integrity()
    cache.swap_in("s")  # the swapped-out sequence is intact
    assert cache.salt("s") == "u" and cache.token_ids("s") == list(range(20, 31))
    assert torch.equal(cache.read_blocks(cache.block_table("s")), s_bytes)
    cache.check_integrity()


def test_freeing_a_swapped_out_id_makes_it_reusable(parked):
    cache, _ = parked
    cache.free("s")
    assert cache.swapped_ids() == [] and cache.tier_stats()["swapped_sequences"] == 0
    cache.fork("a", "s")  # now a new id like any other
    assert cache.token_ids("s") == cache.token_ids("a")
    cache.check_integrity()


# -- random operations over a few ids -------------------------------------------------

IDS = st.sampled_from(["p", "q", "r", "s"])
TOKENS = st.lists(st.integers(0, 5), min_size=1, max_size=10)


class CacheIdsMachine(RuleBasedStateMachine):
    """Every call either does what the model says or raises and changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = new_cache(num_blocks=12)
        self.live: dict[str, list[int]] = {}
        self.swapped: dict[str, list[int]] = {}

    def teardown(self) -> None:
        self.cache.close()

    def _run(self, call, valid: bool) -> bool:
        """Run ``call``; True if it succeeded. Invalid calls (and a full pool) change nothing."""
        before = state(self.cache)
        try:
            call()
        except OutOfBlocks:
            assert valid, "an invalid call must be refused for what it is, not for space"
            assert_same(before, state(self.cache))
            return False
        except (ValueError, KeyError, TypeError):
            assert not valid, "a valid call was refused"
            assert_same(before, state(self.cache))
            return False
        assert valid, "an invalid call was accepted"
        return True

    @rule(sid=IDS, tokens=TOKENS)
    def allocate(self, sid, tokens):
        ok = sid not in self.live and sid not in self.swapped
        if self._run(lambda: self.cache.allocate(sid, tokens), ok):
            self.live[sid] = list(tokens)

    @rule(parent=IDS, child=IDS)
    def fork(self, parent, child):
        ok = parent in self.live and child not in self.live and child not in self.swapped
        if self._run(lambda: self.cache.fork(parent, child), ok):
            self.live[child] = list(self.live[parent])

    @rule(sid=IDS, tokens=TOKENS)
    def append(self, sid, tokens):
        if self._run(lambda: self.cache.append(sid, tokens), sid in self.live):
            self.live[sid] += tokens

    @rule(sid=IDS)
    def free(self, sid):
        if self._run(lambda: self.cache.free(sid), sid in self.live or sid in self.swapped):
            self.live.pop(sid, None)
            self.swapped.pop(sid, None)

    @rule(sid=IDS)
    def swap_out(self, sid):
        if self._run(lambda: self.cache.swap_out(sid), sid in self.live):
            self.swapped[sid] = self.live.pop(sid)

    @rule(sid=IDS)
    def swap_in(self, sid):
        if self._run(lambda: self.cache.swap_in(sid), sid in self.swapped):
            self.live[sid] = self.swapped.pop(sid)

    @invariant()
    def matches_the_model(self):
        self.cache.check_integrity()
        assert sorted(self.cache.seq_ids()) == sorted(self.live)
        assert sorted(self.cache.swapped_ids()) == sorted(self.swapped)
        for sid, tokens in self.live.items():
            assert self.cache.token_ids(sid) == tokens


TestCacheIds = CacheIdsMachine.TestCase
TestCacheIds.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
