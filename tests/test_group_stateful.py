"""Random operation sequences over a KVCacheGroup of three CPU members (hypothesis).

The model says which member holds each sequence and its tokens and salt. Every step
checks the group's integrity, the model, and every sequence's KV bytes (KV is a
function of the token prefix, so prefix hits and moves must preserve it exactly). A
refused call (OutOfBlocks, or an injected copy failure) must change nothing.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from _groupcases import assert_kv, assert_same_state, group_state, write_kv
from pagedkv import KVCacheGroup, KVLayout, OutOfBlocks
from pagedkv.storage import pool_copy

BS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BS, dtype=torch.float32)
MEMBERS = ["cpu#0", "cpu#1", "cpu#2"]
SYSTEM = [[], [1, 2, 0, 1, 2, 2, 0, 1], [2, 2, 1, 0]]  # shared prompt heads: prefix hits
tokens_st = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(SYSTEM),
    st.lists(st.integers(0, 2), min_size=1, max_size=12),
)


class GroupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.g = KVCacheGroup.create(LAYOUT, [10, 14, 8], ["cpu"] * 3)
        self.model: dict[str, list] = {}  # seq -> [member, tokens, salt]
        self.ids = 0

    def _new_id(self) -> str:
        self.ids += 1
        return f"s{self.ids}"

    def _pick(self, data) -> str:
        return data.draw(st.sampled_from(sorted(self.model)))

    @rule(
        tokens=tokens_st,
        salt=st.sampled_from([None, "t"]),
        device=st.sampled_from([None, *MEMBERS]),
    )
    def allocate(self, tokens, salt, device):
        sid, before = self._new_id(), group_state(self.g)
        try:
            cached = self.g.allocate(sid, tokens, salt, device=device)
        except OutOfBlocks:
            assert_same_state(before, group_state(self.g))
            return
        assert device is None or self.g.device_of(sid) == device
        assert cached % BS == 0 and cached < len(tokens)
        write_kv(self.g.cache_of(sid), sid, cached)
        self.model[sid] = [self.g.device_of(sid), list(tokens), salt]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data, extra):
        sid, before = self._pick(data), group_state(self.g)
        try:
            self.g.append(sid, extra)
        except OutOfBlocks:
            assert_same_state(before, group_state(self.g))
            return
        write_kv(self.g.cache_of(sid), sid, len(self.model[sid][1]))
        self.model[sid][1] += extra

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        parent, child = self._pick(data), self._new_id()
        self.g.fork(parent, child)
        member, tokens, salt = self.model[parent]
        self.model[child] = [member, list(tokens), salt]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def move(self, data):
        sid = self._pick(data)
        target = data.draw(st.sampled_from([m for m in MEMBERS if m != self.model[sid][0]]))
        before = group_state(self.g)
        try:
            r = self.g.move(sid, target)
        except OutOfBlocks:
            assert_same_state(before, group_state(self.g))
            return
        blocks = LAYOUT.num_blocks_for(len(self.model[sid][1]))
        assert r.blocks_copied + r.blocks_reused == blocks and r.blocks_copied >= 1
        self.model[sid][0] = target

    @precondition(lambda self: self.model)
    @rule(data=st.data(), after=st.integers(0, 3))
    def failing_move(self, data, after):
        sid = self._pick(data)
        target = data.draw(st.sampled_from([m for m in MEMBERS if m != self.model[sid][0]]))
        before = group_state(self.g)
        real = pool_copy._ROUTES["host"]

        def broken(src, s, dst, d, per):
            real(src, s[:after], dst, d[:after], per)
            raise RuntimeError("injected")

        pool_copy._ROUTES["host"] = broken
        try:
            self.g.move(sid, target)
            raise AssertionError("the move should have failed")
        except (RuntimeError, OutOfBlocks):
            pass
        finally:
            pool_copy._ROUTES["host"] = real
        assert_same_state(before, group_state(self.g), evictions=True)

    @rule(spread=st.sampled_from([0.0, 0.1, 0.3]))
    def rebalance(self, spread):
        for m in self.g.rebalance(spread):
            assert self.model[m.seq_id][0] == m.source
            self.model[m.seq_id][0] = m.target

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        sid = self._pick(data)
        self.g.free(sid)
        del self.model[sid]

    @invariant()
    def consistent(self):
        self.g.check_integrity()
        assert sorted(self.g.seq_ids()) == sorted(self.model)
        for sid, (member, tokens, salt) in self.model.items():
            assert self.g.device_of(sid) == member
            assert self.g.token_ids(sid) == tokens and self.g.salt(sid) == salt
            assert_kv(self.g, sid)


GroupMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGroupMachine = GroupMachine.TestCase
