"""BlockManager.unregister / register: a sequence's blocks hidden from prefix lookups while
their KV is on its way, and published once it is there (what a live migration's target
does); exact block states, integrity after every step, and the checker firing on them."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv import BlockManager
from pagedkv.errors import CacheIntegrityError

BS = 4


def test_hidden_blocks_are_not_found_and_free_as_free_blocks():
    m = BlockManager(16, BS)
    m.allocate("sys", list(range(8)) + [99])
    m.free("sys")  # two cached blocks: a prefix hit for the next one
    prompt = list(range(8)) + list(range(20, 30))  # 2 hit blocks, 2 own full, 1 partial
    assert m.allocate("s", prompt) == 8
    assert m.unregister("s") == 2
    assert m.lookup(prompt + [0]) == 8  # the hit chain stays findable, the rest is hidden
    stats = m.stats()
    m.check_integrity()
    m.free("s")
    after = m.stats()
    # the two hidden blocks and the partial one went back free; the hit chain is cached
    assert after.free_blocks == stats.free_blocks + 3 and after.cached_blocks == 2
    m.check_integrity()


def test_register_publishes_and_appends_chain_after_it():
    m = BlockManager(16, BS)
    prompt = list(range(30, 41))  # 2 full blocks + 3 tokens
    m.allocate("s", prompt)
    m.unregister("s")
    m.append("s", [41, 42, 43, 44, 45])  # fills block 2 (registered, but behind hidden ones)
    assert m.lookup(prompt + [41, 42, 43, 44, 45, 0]) == 0
    assert m.register("s") == 2
    assert m.register("s") == 0  # nothing left to publish
    assert m.lookup(prompt + [41, 42, 43, 44, 45, 0]) == 16
    m.check_integrity()
    m.free("s")
    assert m.stats().cached_blocks == 4
    m.check_integrity()


def test_content_registered_meanwhile_keeps_the_other_block():
    m = BlockManager(16, BS)
    prompt = list(range(50, 59))
    m.allocate("s", prompt)
    m.unregister("s")
    m.allocate("twin", prompt)  # computes the same prefix meanwhile: its blocks are indexed
    theirs = m.block_table("twin")[:2]
    assert m.register("s") == 0
    m.check_integrity()
    m.free("s")  # its blocks are free, the twin's remain the ones found
    m.free("twin")
    assert m.lookup(prompt) == 8
    m.allocate("again", prompt)
    assert m.block_table("again")[:2] == theirs
    m.check_integrity()


def test_a_fork_keeps_shared_hidden_blocks_hidden():
    m = BlockManager(16, BS)
    prompt = list(range(60, 69))
    m.allocate("s", prompt)
    m.unregister("s")
    m.fork("s", "child")
    assert m.register("s") == 0  # shared with the child, which lists them anonymous too
    m.check_integrity()
    m.free("child")
    assert m.register("s") == 2
    m.check_integrity()


def test_without_prefix_caching_both_do_nothing_and_unknown_ids_raise():
    m = BlockManager(8, BS, prefix_caching=False)
    m.allocate("s", list(range(9)))
    assert m.unregister("s") == 0 and m.register("s") == 0
    m.check_integrity()
    for call in (m.unregister, m.register):
        with pytest.raises(KeyError, match="unknown sequence"):
            call("nope")
        with pytest.raises(TypeError, match="hashable"):
            call([1])


def test_the_checker_fires_on_a_hidden_block_not_listed_anonymous():
    m = BlockManager(16, BS)
    m.allocate("s", list(range(70, 79)))
    m.unregister("s")
    m._seqs["s"].anonymous.pop()  # the damage: a hidden block free() would cache
    with pytest.raises(CacheIntegrityError, match="unregistered"):
        m.check_integrity()


class RegistrationMachine(RuleBasedStateMachine):
    """allocate / append / unregister / register / free in any order, integrity always;
    the blocks unregister() hid stay unregistered until register(), which makes the
    sequence's whole full-block prefix findable again."""

    def __init__(self) -> None:
        super().__init__()
        self.m = BlockManager(96, BS)
        self.live: dict[int, list[int]] = {}
        self.hidden: dict[int, set[int]] = {}  # seq -> the blocks unregister() hid
        self.n = 0

    def hashed(self, blocks) -> set[int]:
        return {b for b in blocks if self.m._prefix.hashes[b]}

    @precondition(lambda self: len(self.live) < 6)
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=13))
    def allocate(self, tokens):
        self.m.allocate(self.n, tokens)
        self.live[self.n] = tokens
        self.n += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data(), more=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data, more):
        sid = data.draw(st.sampled_from(sorted(self.live)))
        if len(self.live[sid]) + len(more) <= 40:
            self.m.append(sid, more)
            self.live[sid] = self.live[sid] + more

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def unregister(self, data):
        sid = data.draw(st.sampled_from(sorted(self.live)))
        before = self.hashed(self.m.block_table(sid))
        n = self.m.unregister(sid)
        hid = before - self.hashed(self.m.block_table(sid))
        assert n == len(hid)
        self.hidden[sid] = self.hidden.get(sid, set()) | hid

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def register(self, data):
        sid = data.draw(st.sampled_from(sorted(self.live)))
        self.m.register(sid)
        self.hidden.pop(sid, None)
        tokens = self.live[sid]
        assert self.m.lookup(tokens + [0]) == len(tokens) // BS * BS

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.live)))
        self.m.free(sid)
        del self.live[sid]
        self.hidden.pop(sid, None)

    @invariant()
    def consistent(self):
        self.m.check_integrity()
        for blocks in self.hidden.values():
            assert not self.hashed(blocks)


TestRegistrationMachine = RegistrationMachine.TestCase
TestRegistrationMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
