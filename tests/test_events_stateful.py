"""KV events under random operation sequences, model changes included (hypothesis).

A consumer that only applies the events (stored: add, removed: discard, cleared: forget
all) must always know exactly the blocks registered since the last clear: what a router
fed by the events believes is on the device is what is there, and nothing of an earlier
model fingerprint.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from pagedkv.events import AllBlocksCleared, BlockRemoved, BlockStored
from test_manager_stateful import SmallPool, SmallPoolLFU, SmallPoolTTL


class EventReplica:
    def __init__(self) -> None:
        self.known: set[bytes] = set()
        self.batches = 0

    def __call__(self, events: list) -> None:
        assert events, "an empty batch was delivered"
        self.batches += 1
        for e in events:
            if isinstance(e, BlockStored):
                assert e.medium == "device" and len(e.token_ids) == 4 * len(e.block_hashes)
                assert not self.known & set(e.block_hashes), "stored twice"
                self.known.update(e.block_hashes)
            elif isinstance(e, BlockRemoved):
                self.known.difference_update(e.block_hashes)
            else:
                assert isinstance(e, AllBlocksCleared)
                self.known.clear()


class EventsMixin:
    def __init__(self) -> None:
        super().__init__()
        self.replica = EventReplica()
        self.m.subscribe(self.replica)
        self.cleared_at = 0  # registration stamp of the last AllBlocksCleared

    @rule(version=st.integers(0, 2))
    def change_model(self, version):
        before = self.m.generation
        if self.m.set_extra_keys((f"v{version}",)):
            assert self.m.generation == before + 1
            self.cleared_at = self.m._prefix.stamp

    @rule(force=st.booleans())
    def reset(self, force):
        done = force or not self.seqs
        super().reset(force)  # checks it succeeds exactly then, and changes nothing else
        if done:  # forced: the blocks in use were unregistered (removed) before the clear
            self.cleared_at = self.m._prefix.stamp

    @invariant()
    def replica_matches(self):
        m = self.m
        stamps = m._alloc.registered_at
        now = {h for b, h in enumerate(m._prefix.hashes) if h and stamps[b] > self.cleared_at}
        assert self.replica.known == now
        assert 0 <= m.stats().invalidated_blocks <= len(m._prefix)


class EventsLRU(EventsMixin, SmallPool):
    pass


class EventsLFU(EventsMixin, SmallPoolLFU):
    pass


class EventsTTL(EventsMixin, SmallPoolTTL):
    pass


_SETTINGS = settings(
    max_examples=40, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow], database=None,
)  # fmt: skip
TestEventsLRU = EventsLRU.TestCase
TestEventsLRU.settings = _SETTINGS
TestEventsLFU = EventsLFU.TestCase
TestEventsLFU.settings = _SETTINGS
TestEventsTTL = EventsTTL.TestCase
TestEventsTTL.settings = _SETTINGS
