"""Random operation sequences against a simple model (hypothesis stateful testing).

``BigPool`` never evicts, so a prefix hit must equal the model's longest common
full-block prefix with some earlier sequence of the same salt. The small-pool
variants run every policy (and TTL with a fake clock) into eviction and OutOfBlocks,
checking that a failed call changes nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv import BlockManager, OutOfBlocks
from test_manager_errors import capture

BS = 4
SALTS = [None, "s"]
tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=14)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ManagerMachine(RuleBasedStateMachine):
    NUM_BLOCKS = 4096
    POLICY = "lru"
    TTL: float | None = None
    EXACT_HITS = True  # no eviction or expiry can happen: hits are exactly the model's

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.m = BlockManager(
            self.NUM_BLOCKS,
            BS,
            eviction=self.POLICY,
            ttl_seconds=self.TTL,
            clock=self.clock,
            on_evict=self._on_evict,
        )
        self.seqs: dict[int, tuple[list[int], object]] = {}  # id -> (tokens, salt)
        self.seen: dict[object, set[tuple[int, ...]]] = {s: set() for s in SALTS}
        self.history: list[tuple[list[int], object]] = []
        self.pins: list[tuple[list[int], object]] = []
        self.next_id = 0

    # ---- model helpers ----------------------------------------------------------------------
    def _held(self, sid) -> list[int]:
        """The blocks ``sid`` holds: its table without entries released outside a window."""
        return self.m.block_table(sid)[self.m.num_released(sid) :]

    def _on_evict(self, block: int, block_hash: bytes) -> None:
        for sid in self.m.seq_ids():  # never a block in use
            assert block not in self._held(sid)
        for toks, salt in self.pins:  # never a pinned prefix
            assert block_hash not in self.m.hash_blocks(toks, salt)

    def _remember(self, tokens: list[int], salt: object) -> None:
        for k in range(1, len(tokens) // BS + 1):
            self.seen[salt].add(tuple(tokens[: k * BS]))

    def _model_hit(self, tokens: list[int], salt: object) -> int:
        k = (len(tokens) - 1) // BS
        while k and tuple(tokens[: k * BS]) not in self.seen[salt]:
            k -= 1
        return k * BS

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _pick(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.seqs)), label="seq")

    def _draw_prompt(self, data) -> tuple[list[int], object]:
        if self.history and data.draw(st.booleans(), label="extend"):
            base, salt = data.draw(st.sampled_from(self.history), label="base")
            cut = data.draw(st.integers(0, len(base)), label="cut")
            toks = base[:cut] + data.draw(st.lists(st.integers(0, 3), max_size=9), label="tail")
            if data.draw(st.integers(0, 4), label="salt-switch") == 0:
                salt = data.draw(st.sampled_from(SALTS), label="salt")
            if not toks:
                toks = [0]
        else:
            toks = data.draw(tokens_st, label="tokens")
            salt = data.draw(st.sampled_from(SALTS), label="salt")
        return toks, salt

    # ---- rules ------------------------------------------------------------------------------
    @rule(data=st.data())
    def allocate(self, data):
        toks, salt = self._draw_prompt(data)
        sid = self._new_id()
        predicted = self.m.lookup(toks, salt)  # pure; allocate must agree
        free_before = self.m.num_free_blocks
        before = capture(self.m)
        try:
            got = self.m.allocate(sid, toks, salt=salt)
        except OutOfBlocks:
            assert ceil_div(len(toks), BS) > free_before
            assert capture(self.m) == before
            return
        assert ceil_div(len(toks), BS) - got // BS <= free_before
        assert got == predicted
        assert got % BS == 0 and got <= len(toks) - 1
        model = self._model_hit(toks, salt)
        if self.EXACT_HITS:
            assert got == model, (toks, salt)
        else:
            assert got <= model
        self.seqs[sid] = (list(toks), salt)
        self._remember(toks, salt)
        self.history = (self.history + [(list(toks), salt)])[-24:]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def append(self, data, extra):
        sid = self._pick(data)
        toks, salt = self.seqs[sid]
        n = len(toks)
        tables = {s: self._held(s) for s in self.m.seq_ids()}
        old = self.m.block_table(sid)
        holders = sum(t.count(old[-1]) for t in tables.values())
        expect_cow = n % BS != 0 and holders > 1
        need = ceil_div(n + len(extra), BS) - len(old) + expect_cow
        free_before = self.m.num_free_blocks
        before = capture(self.m)
        try:
            self.m.append(sid, extra)
        except OutOfBlocks:
            assert need > free_before
            assert capture(self.m) == before
            return
        assert need <= free_before
        new = self.m.block_table(sid)
        copies = self.m.take_copies()
        if expect_cow:
            assert copies == [(old[-1], new[len(old) - 1])]
            assert new[: len(old) - 1] == old[:-1] and new[len(old) - 1] != old[-1]
            assert all(new[len(old) - 1] not in t for s, t in tables.items())
        else:
            assert copies == [] and new[: len(old)] == old
        for b in new[len(old) :]:
            assert all(b not in t for t in tables.values())
        toks = toks + list(extra)
        self.seqs[sid] = (toks, salt)
        self._remember(toks, salt)
        self.history = (self.history + [(list(toks), salt)])[-24:]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data)
        child = self._new_id()
        self.m.fork(parent, child)
        assert self.m.block_table(child) == self.m.block_table(parent)
        toks, salt = self.seqs[parent]
        self.seqs[child] = (list(toks), salt)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def release_before(self, data):
        sid = self._pick(data)
        n = len(self.seqs[sid][0])
        cut = data.draw(st.integers(0, n), label="num_tokens")
        old, table = self.m.num_released(sid), self.m.block_table(sid)
        used_before = self.m.num_used_blocks
        got = self.m.release_before(sid, cut)
        new = max(old, cut // BS)
        assert got == new - old and self.m.num_released(sid) == new
        assert self.m.block_table(sid) == [0] * new + table[new:]
        assert self.m.num_used_blocks <= used_before  # shared blocks stay in use

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = self._pick(data)
        self.m.free(sid)
        del self.seqs[sid]

    @rule(data=st.data())
    def pin(self, data):
        toks, salt = self._draw_prompt(data)
        if len(toks) < BS:
            before = capture(self.m)
            with pytest.raises(ValueError, match="token_ids"):
                self.m.pin(toks, salt)
            assert capture(self.m) == before
            return
        resident = self.m.pin(toks, salt)
        assert 0 <= resident <= len(toks) // BS
        self.pins.append((list(toks), salt))

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        i = data.draw(st.integers(0, len(self.pins) - 1), label="pin")
        toks, salt = self.pins.pop(i)
        assert self.m.unpin(toks, salt) == len(toks) // BS

    @rule()
    def reset(self):
        before = capture(self.m)
        ok = self.m.reset_prefix_cache()
        assert ok == (not self.seqs)
        if ok:
            self.seen = {s: set() for s in SALTS}
            s = self.m.stats()
            assert s.free_blocks == self.m.num_blocks and s.cached_blocks == 0
        else:
            assert capture(self.m) == before

    @rule(data=st.data())
    def lookup(self, data):
        toks, salt = self._draw_prompt(data)
        before = capture(self.m)
        got = self.m.lookup(toks, salt)
        model = self._model_hit(toks, salt)
        assert got == model if self.EXACT_HITS else got <= model
        assert capture(self.m) == before

    @rule(data=st.data(), which=st.integers(0, 7))
    def bad_call(self, data, which):
        m = self.m
        before = capture(m)
        live = sorted(self.seqs)
        calls = [
            (lambda: m.allocate(live[0], [1]), ValueError) if live else None,
            (lambda: m.allocate(-1, [1, -1]), ValueError),
            (lambda: m.append(live[0], []), ValueError) if live else None,
            (lambda: m.fork(-5, -6), KeyError),
            (lambda: m.free(-7), KeyError),
            (lambda: m.slot_mapping(live[0], 0, 10**6), ValueError) if live else None,
            (lambda: m.release_before(live[0], 10**6), ValueError) if live else None,
            (lambda: m.unpin([3, 3, 3, 3, 2, 2, 2, 2, 1]), ValueError)
            if not any(p[0][:8] == [3, 3, 3, 3, 2, 2, 2, 2] and p[1] is None for p in self.pins)
            else None,
        ]
        call = calls[which]
        if call is None:
            return
        fn, exc = call
        with pytest.raises(exc):
            fn()
        assert capture(m) == before

    # ---- invariants ------------------------------------------------------------------------------
    @invariant()
    def consistent(self):
        m = self.m
        m.check_integrity()
        assert m.take_copies() == []  # only append produces copies; it drains them
        assert sorted(m.seq_ids()) == sorted(self.seqs)
        holders: dict[int, list[tuple[int, int]]] = {}
        for sid, (toks, _salt) in self.seqs.items():
            n = len(toks)
            assert m.num_tokens(sid) == n and m.token_ids(sid) == toks
            released = m.num_released(sid)
            table, held = m.block_table(sid), self._held(sid)
            assert len(table) == ceil_div(n, BS) and len(set(held)) == len(held)
            assert len(m.slot_mapping(sid, released * BS)) == n - released * BS
            assert m.block_hashes(sid) == m.hash_blocks(toks, _salt)
            for i, b in enumerate(held, released):
                holders.setdefault(b, []).append((sid, i))
        # A block shared by two sequences: same position, same salt, same tokens up to and
        # including the positions it covers (prefix sharing or fork), nothing else.
        for b, hs in holders.items():
            if len(hs) < 2:
                continue
            sid0, i0 = hs[0]
            toks0, salt0 = self.seqs[sid0]
            for sid, i in hs[1:]:
                toks, salt = self.seqs[sid]
                assert i == i0, (b, hs)
                assert salt == salt0, (b, hs)
                end0 = min((i + 1) * BS, len(toks0))
                end = min((i + 1) * BS, len(toks))
                assert end == end0 and toks[:end] == toks0[:end], (b, hs)
        s = m.stats()
        assert s.used_blocks == len(holders) and s.num_sequences == len(self.seqs)
        assert s.used_blocks + s.cached_blocks + s.free_blocks == s.num_blocks
        assert m.num_free_blocks == s.num_blocks - s.used_blocks - s.pinned_blocks
        if self.EXACT_HITS:
            assert s.evictions == 0


class SmallPool(ManagerMachine):
    NUM_BLOCKS = 10
    EXACT_HITS = False


class SmallPoolFIFO(SmallPool):
    POLICY = "fifo"


class SmallPoolLFU(SmallPool):
    POLICY = "lfu"


class SmallPoolTTL(SmallPool):
    POLICY = "fifo"
    TTL = 5.0

    @rule(dt=st.sampled_from([0.5, 2.0, 5.0, 7.0]))
    def tick(self, dt):
        self.clock.now += dt


_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
TestBigPool = ManagerMachine.TestCase
TestBigPool.settings = settings(max_examples=60, stateful_step_count=80, **_common)
TestSmallPoolLRU = SmallPool.TestCase
TestSmallPoolLRU.settings = settings(max_examples=40, stateful_step_count=60, **_common)
TestSmallPoolFIFO = SmallPoolFIFO.TestCase
TestSmallPoolFIFO.settings = settings(max_examples=25, stateful_step_count=60, **_common)
TestSmallPoolLFU = SmallPoolLFU.TestCase
TestSmallPoolLFU.settings = settings(max_examples=25, stateful_step_count=60, **_common)
TestSmallPoolTTL = SmallPoolTTL.TestCase
TestSmallPoolTTL.settings = settings(max_examples=30, stateful_step_count=60, **_common)
