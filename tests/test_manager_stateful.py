"""Random operation sequences against a simple model (hypothesis stateful testing).

``BigPool`` never evicts, so a prefix hit must equal the model's longest chain of
registered full-block prefixes (of the same salt). The small-pool variants run every
policy (and TTL with a fake clock, and the prefix limits) into eviction and
OutOfBlocks, checking that a failed call changes nothing. Private requests
(``share_prefix=False``, prompts below ``min_prefix_tokens``), ``share_prefix``,
``evict``, ``gc`` and forced resets are drawn too; every step ends in
``check_integrity`` and an exact check of ``seq_stats`` and the call counters.
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
    MIN_PREFIX = 0
    MAX_CACHED: int | None = None
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
            min_prefix_tokens=self.MIN_PREFIX,
            max_cached_blocks=self.MAX_CACHED,
        )
        self.seqs: dict[int, tuple[list[int], object]] = {}  # id -> (tokens, salt)
        self.private: set[int] = set()
        self.calls = {"with_hit": 0, "without_hit": 0, "freed": 0}
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

    def _remember(self, tokens: list[int], salt: object, first: int = 0) -> None:
        """Full-block prefixes ``first + 1 ..`` of ``tokens`` were registered."""
        for k in range(first + 1, len(tokens) // BS + 1):
            self.seen[salt].add(tuple(tokens[: k * BS]))

    def _model_hit(self, tokens: list[int], salt: object) -> int:
        # A hit is a chain from the root: every shorter prefix must be registered too
        # (after a forced reset, live sequences register blocks whose parents are not).
        if len(tokens) < self.MIN_PREFIX:
            return 0
        k = 0
        while k < (len(tokens) - 1) // BS and tuple(tokens[: (k + 1) * BS]) in self.seen[salt]:
            k += 1
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
    @rule(data=st.data(), shared=st.sampled_from([True, True, True, False]))
    def allocate(self, data, shared):
        toks, salt = self._draw_prompt(data)
        sid = self._new_id()
        predicted = self.m.lookup(toks, salt) if shared else 0  # pure; allocate must agree
        free_before = self.m.num_free_blocks
        before = capture(self.m)
        try:
            got = self.m.allocate(sid, toks, salt=salt, share_prefix=shared)
        except OutOfBlocks:
            assert ceil_div(len(toks), BS) > free_before
            assert capture(self.m) == before
            return
        assert ceil_div(len(toks), BS) - got // BS <= free_before
        assert got == predicted
        assert got % BS == 0 and got <= len(toks) - 1
        private = not shared or len(toks) < self.MIN_PREFIX
        model = 0 if private else self._model_hit(toks, salt)
        if self.EXACT_HITS:
            assert got == model, (toks, salt)
        else:
            assert got <= model
        self.calls["with_hit" if got else "without_hit"] += 1
        self.seqs[sid] = (list(toks), salt)
        if private:
            self.private.add(sid)
        else:
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
        if sid not in self.private:
            self._remember(toks, salt, first=n // BS)
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
        if parent in self.private:
            self.private.add(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def share_prefix(self, data):
        src = self._pick(data)
        toks, salt = self.seqs[src]
        k = data.draw(st.integers(1, len(toks)), label="num_tokens")
        dst = self._new_id()
        old = self.m.block_table(src)
        others = {b for s in self.m.seq_ids() for b in self._held(s)}
        full, rest = divmod(k, BS)
        need = 1 if rest and k < len(toks) else 0
        free_before = self.m.num_free_blocks
        before = capture(self.m)
        released = self.m.num_released(src)
        if k < len(toks) and (full < released or (full == released and not rest and released)):
            with pytest.raises(ValueError, match="released its blocks"):
                self.m.share_prefix(src, dst, k)  # dst would hold a released block
            assert capture(self.m) == before
            return
        try:
            self.m.share_prefix(src, dst, k)
        except OutOfBlocks:
            assert need > free_before
            assert capture(self.m) == before
            return
        new = self.m.block_table(dst)
        copies = self.m.take_copies()
        if need:
            assert new[:full] == old[:full] and len(new) == full + 1
            assert new[full] not in others and copies == [(old[full], new[full])]
        else:
            assert new == old[: ceil_div(k, BS)] and copies == []
        assert self.m.block_table(src) == old and self.m.token_ids(dst) == toks[:k]
        self.seqs[dst] = (toks[:k], salt)
        if src in self.private:
            self.private.add(dst)

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
        self.private.discard(sid)
        self.calls["freed"] += 1

    # an eviction would change BigPool's exact hits; drawn only when there is a candidate
    @precondition(lambda self: not self.EXACT_HITS and self.m.eviction_order())
    @rule(n=st.integers(0, 4))
    def evict(self, n):
        s = self.m.stats()
        evictable = len(self.m.eviction_order())
        got = self.m.evict(n)
        assert got <= min(n, evictable) and self.m.stats().evictions >= s.evictions + got
        if self.TTL is None:
            assert got == min(n, evictable) and self.m.stats().free_blocks == s.free_blocks + got

    @rule()
    def gc(self):
        evictable = len(self.m.eviction_order())
        freed = self.m.gc()
        assert freed == evictable - len(self.m.eviction_order())
        if self.TTL is None:
            assert freed == 0  # caps are kept at every release; only expiry is left to do

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

    @rule(force=st.booleans())
    def reset(self, force):
        before = capture(self.m)
        tables = {sid: self.m.block_table(sid) for sid in self.seqs}
        used = self.m.num_used_blocks
        ok = self.m.reset_prefix_cache(force=force)
        # refused while any block is in use: a live sequence may hold none (all released)
        holding = any(len(t) > self.m.num_released(sid) for sid, t in tables.items())
        assert ok == (force or not holding)
        if ok:
            self.seen = {s: set() for s in SALTS}
            s = self.m.stats()
            assert s.free_blocks == self.m.num_blocks - used and s.cached_blocks == 0
            assert {sid: self.m.block_table(sid) for sid in self.seqs} == tables
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

    @rule(data=st.data(), which=st.integers(0, 12))
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
            (lambda: m.share_prefix(live[0], -8, m.num_tokens(live[0]) + 1), ValueError)
            if live
            else None,
            (lambda: m.share_prefix(live[0], live[-1], 1), ValueError) if live else None,
            (lambda: m.share_prefix(-9, -8, 1), KeyError),
            (lambda: m.evict(-1), ValueError),
            (lambda: m.allocate(-10, [1], share_prefix=None), TypeError),
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
            if sid in self.private:
                assert m.block_hashes(sid) == []
            elif m.generation_of(sid) == m.generation:  # else its hashes are the old model's
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
        for sid, (toks, _salt) in self.seqs.items():
            held = self._held(sid)
            st_ = m.seq_stats(sid)
            shared = sum(1 for b in held if len(holders[b]) > 1)
            assert (st_.blocks, st_.tokens, st_.shared_blocks) == (len(held), len(toks), shared)
            in_held = len(toks) - m.num_released(sid) * BS  # tokens of the blocks it holds
            fill = in_held / (len(held) * BS) if held else 1.0  # nothing held: nothing wasted
            assert st_.utilization == fill and st_.bytes is None
            assert st_.last_access <= self.clock.now
            assert m.shares_prefix(sid) == (sid not in self.private)
        s = m.stats()
        assert (s.requests_with_hit, s.requests_without_hit, s.deallocations) == (
            self.calls["with_hit"], self.calls["without_hit"], self.calls["freed"],
        )  # fmt: skip
        if self.MAX_CACHED is not None:
            assert s.cached_blocks - s.pinned_blocks <= self.MAX_CACHED
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


class BigPoolMinPrefix(ManagerMachine):
    MIN_PREFIX = 6


class SmallPoolLimits(SmallPool):
    MIN_PREFIX = 5
    MAX_CACHED = 3


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
TestBigPoolMinPrefix = BigPoolMinPrefix.TestCase
TestBigPoolMinPrefix.settings = settings(max_examples=30, stateful_step_count=60, **_common)
TestSmallPoolLimits = SmallPoolLimits.TestCase
TestSmallPoolLimits.settings = settings(max_examples=30, stateful_step_count=60, **_common)
TestSmallPoolTTL = SmallPoolTTL.TestCase
TestSmallPoolTTL.settings = settings(max_examples=30, stateful_step_count=60, **_common)
