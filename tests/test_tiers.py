"""Offload tiers driven directly (TieredStore + KVPool + hand-made hashes): CPU and disk.

Redis is in test_tiers_redis.py, several processes in test_tiers_processes.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import pytest
import torch

from _tiercases import BPB, LAYOUT, chain, hashes, make_pool
from pagedkv.errors import OutOfBlocks, StoreError
from pagedkv.storage import KVLayout, KVPool
from pagedkv.tiers import CPUTier, DiskTier, RedisTier, TieredStore
from pagedkv.tiers.health import Backoff


def evict_into(ts: TieredStore, ids: list[int], hs: list[bytes]) -> torch.Tensor:
    """Demote blocks ``ids`` under hashes ``hs``; return their bytes as they were."""
    before = ts._transfer.pool.read_blocks(ids).clone()
    ts.demote(list(zip(ids, hs)))
    return before


def scribble(pool: KVPool) -> None:
    pool.kv.fill_(-7.0)  # what the pool's next tenants would do to the blocks


@pytest.fixture(params=["cpu", "disk"])
def one_tier(request, tmp_path):
    if request.param == "cpu":
        return CPUTier(64 * BPB)
    return DiskTier(tmp_path / "kv", 64 * (BPB + 64))


def test_round_trip_bit_exact_per_tier(one_tier):
    ts = chain([one_tier])
    hs = hashes(6)
    before = evict_into(ts, [3, 9, 1, 0, 30, 17], hs)
    ts.flush()
    scribble(ts._transfer.pool)
    dst = [5, 6, 7, 8, 10, 11]
    assert ts.promote(hs, dst) == 6
    assert torch.equal(ts._transfer.pool.read_blocks(dst), before)
    st = ts.stats()
    name = "cpu" if isinstance(one_tier, CPUTier) else "disk"
    assert st["tiers"][name]["hits"] == 6 and st["tiers"][name]["puts"] == 6
    assert st["promoted"] == 6 and st["lookups"] == 6 and st["demoted"] == 6
    ts.check_integrity()
    ts.close()


def test_promote_before_write_back_finished_is_served_from_staging(tmp_path):
    ts = chain([DiskTier(tmp_path, 64 * (BPB + 64))])
    gate = threading.Event()
    level = ts.levels[0]
    real_put = level.put
    level.put = lambda *args, **kw: (gate.wait(5), real_put(*args, **kw))[1]
    hs = hashes(3)
    before = evict_into(ts, [0, 1, 2], hs)
    scribble(ts._transfer.pool)
    assert ts.promote(hs, [4, 5, 6]) == 3
    assert torch.equal(ts._transfer.pool.read_blocks([4, 5, 6]), before)
    assert ts.stats()["pending_hits"] == 3
    gate.set()
    ts.flush()
    assert ts.stats()["tiers"]["disk"]["puts"] == 3 and ts.stats()["pending_bytes"] == 0
    ts.close()


def test_only_the_leading_run_is_loaded(tmp_path):
    ts = chain([CPUTier(16 * BPB)])
    hs = hashes(4)
    evict_into(ts, [0, 2, 3], [hs[0], hs[2], hs[3]])  # hs[1] never stored
    ts.flush()
    scribble(ts._transfer.pool)
    assert ts.promote(hs, [10, 11, 12, 13]) == 1
    assert ts._transfer.pool.kv[:, :, 11].eq(-7.0).all()  # nothing past the run was written
    assert ts.promote(hashes(2, "zz"), [10, 11]) == 0
    assert ts.promote([], []) == 0
    with pytest.raises(ValueError, match="2 hashes but 1 block ids"):
        ts.promote(hs[:2], [0])
    ts.close()


def test_spill_chain_cpu_to_disk_and_hits_per_tier(tmp_path):
    pool = make_pool()
    ts = chain([CPUTier(2 * BPB), DiskTier(tmp_path, 64 * (BPB + 64))], pool)
    hs = hashes(5)
    before = []
    for i in range(5):  # one eviction at a time: the CPU tier's LRU spills to disk
        before.append(evict_into(ts, [i], [hs[i]]))
        ts.flush()
    st = ts.stats()["tiers"]
    assert st["cpu"]["entries"] == 2 and st["cpu"]["spilled"] == 3
    assert st["disk"]["puts"] == 3 and st["disk"]["entries"] == 3
    scribble(pool)
    assert ts.promote(hs, [10, 11, 12, 13, 14]) == 5
    assert torch.equal(pool.read_blocks([10, 11, 12, 13, 14]), torch.cat(before))
    st = ts.stats()["tiers"]
    assert (st["disk"]["hits"], st["cpu"]["hits"]) == (3, 2)
    ts.check_integrity()
    ts.close()


def test_batch_larger_than_first_tier_goes_straight_down(tmp_path):
    ts = chain([CPUTier(3 * BPB), DiskTier(tmp_path, 64 * (BPB + 64))])
    ts._transfer.chunk = 3
    hs = hashes(8)
    before = evict_into(ts, list(range(8)), hs)
    ts.flush()
    st = ts.stats()["tiers"]
    assert st["cpu"]["entries"] == 3 and st["disk"]["entries"] == 5
    scribble(ts._transfer.pool)
    assert ts.promote(hs, list(range(10, 18))) == 8
    assert torch.equal(ts._transfer.pool.read_blocks(list(range(10, 18))), before)
    ts.close()


def test_demote_of_a_block_the_first_tier_holds_is_not_copied_again():
    ts = chain([CPUTier(8 * BPB)])
    hs = hashes(2)
    evict_into(ts, [0, 1], hs)
    ts.flush()
    assert ts.promote(hs, [5, 6]) == 2
    ts.demote([(5, hs[0]), (6, hs[1])])  # evicted again after the hit
    ts.flush()
    st = ts.stats()
    assert st["demoted"] == 2 and st["tiers"]["cpu"]["puts"] == 2
    ts.close()


def test_write_through_reaches_every_tier(tmp_path):
    ts = chain([CPUTier(8 * BPB), DiskTier(tmp_path, 64 * (BPB + 64))])
    hs = hashes(3)
    before = ts._transfer.pool.read_blocks([0, 1, 2]).clone()
    ts.write_through(list(zip([0, 1, 2], hs)))
    ts.write_through(list(zip([0, 1, 2], hs)))  # recently written through: not copied again
    ts.flush()
    ts._written_through.clear()
    ts.write_through(list(zip([0, 1, 2], hs)))  # every tier already holds them: no put
    ts.flush()
    st = ts.stats()
    assert st["tiers"]["cpu"]["puts"] == 3 and st["tiers"]["disk"]["puts"] == 3
    assert st["written_through"] == 6
    ts.close()
    # the disk copy alone serves a fresh cache
    ts2 = chain([DiskTier(tmp_path, 64 * (BPB + 64))])
    assert ts2.promote(hs, [7, 8, 9]) == 3
    assert torch.equal(ts2._transfer.pool.read_blocks([7, 8, 9]), before)
    ts2.close()


def test_corrupt_disk_entry_is_a_miss_and_deleted(tmp_path):
    ts = chain([DiskTier(tmp_path, 64 * (BPB + 64))])
    hs = hashes(3)
    evict_into(ts, [0, 1, 2], hs)
    ts.flush()
    path = next(p for p in tmp_path.rglob("*.v") if hs[1].hex() in p.name)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    assert ts.promote(hs, [5, 6, 7]) == 1  # block 1 is bad: the run stops there
    st = ts.stats()["tiers"]["disk"]
    assert st["corrupt"] == 1 and not path.exists()
    assert ts.promote(hs[1:], [6, 7]) == 0
    ts.close()


def test_other_fingerprint_or_layout_never_hits(tmp_path):
    ts = chain([DiskTier(tmp_path, 64 * (BPB + 64))], fingerprint="model-a")
    hs = hashes(2)
    evict_into(ts, [0, 1], hs)
    ts.close()
    other = chain([DiskTier(tmp_path, 64 * (BPB + 64))], fingerprint="model-b")
    assert other.key(hs[0]) != ts.key(hs[0])
    assert other.promote(hs, [4, 5]) == 0
    other.close()
    lay2 = KVLayout(2, 2, 8, 4, torch.float16)
    ts2 = TieredStore([DiskTier(tmp_path, 64 * (BPB + 64))], lay2, "model-a")
    ts2.attach(KVPool(lay2, 8))
    assert ts2.promote(hs, [4, 5]) == 0
    ts2.close()
    same = chain([DiskTier(tmp_path, 64 * (BPB + 64))], fingerprint="model-a")
    assert same.promote(hs, [4, 5]) == 2
    same.close()


def test_entry_under_right_key_but_wrong_fingerprint_is_rejected(tmp_path):
    """Even a key collision across fingerprints is caught by the framed fingerprint."""
    a = chain([DiskTier(tmp_path / "a", 64 * (BPB + 64))], fingerprint="model-a")
    b = chain([DiskTier(tmp_path / "b", 64 * (BPB + 64))], fingerprint="model-b")
    hs = hashes(1)
    evict_into(b, [0], hs)
    b.flush()
    src = next((tmp_path / "b").rglob("*.v"))
    dst = tmp_path / "a" / src.parent.name / (a.key(hs[0]) + ".v")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    assert a.promote(hs, [3]) == 0 and a.stats()["tiers"]["disk"]["corrupt"] == 1
    a.close()
    b.close()


def test_swap_out_in_bit_exact_and_never_evicted(tmp_path):
    pool = make_pool()
    ts = chain([CPUTier(2 * BPB, swap_bytes=4 * BPB), DiskTier(tmp_path, 64 * (BPB + 64))], pool)
    ts._transfer.chunk = 2  # move blocks in chunks of 2 (a long sequence in bounded staging)
    before = pool.read_blocks([3, 7, 1]).clone()
    ts.swap_out("seq-1", [3, 7, 1])
    scribble(pool)
    for i in range(10):  # heavy demotion traffic must not touch the swap area
        ts.demote([(i, hashes(10, "x")[i])])
    ts.flush()
    assert ts.stats()["swapped_bytes"] == 3 * BPB
    ts.swap_in("seq-1", [20, 21, 22])
    assert torch.equal(pool.read_blocks([20, 21, 22]), before)
    st = ts.stats()
    assert st["swapped_sequences"] == 0 and st["swapped_bytes"] == 0
    ts.check_integrity()
    ts.close()


def test_swap_errors_change_nothing(tmp_path):
    pool = make_pool()
    ts = chain([CPUTier(2 * BPB, swap_bytes=3 * BPB)], pool)
    ts.swap_out("a", [0, 1])
    with pytest.raises(OutOfBlocks, match="swap_bytes"):
        ts.swap_out("b", [2, 3])
    with pytest.raises(ValueError, match="already swapped out"):
        ts.swap_out("a", [4])
    with pytest.raises(KeyError):
        ts.swap_in("nope", [0])
    with pytest.raises(ValueError, match="2 blocks were swapped out"):
        ts.swap_in("a", [5])
    with pytest.raises(ValueError, match="distinct"):
        ts.swap_in("a", [5, 5])
    assert ts.stats()["swapped_bytes"] == 2 * BPB
    assert ts.discard_swap("a") and not ts.discard_swap("a")
    ts.swap_out("b", [2, 3, 4])  # now it fits
    ts.check_integrity()
    ts.close()
    no_swap = chain([CPUTier(2 * BPB, swap_bytes=0)])
    with pytest.raises(OutOfBlocks):
        no_swap.swap_out("a", [0])
    no_swap.close()
    disk_first = chain([DiskTier(tmp_path, 64 * (BPB + 64)), CPUTier(4 * BPB)])
    with pytest.raises(ValueError, match="CPUTier as the first tier"):
        disk_first.swap_out("a", [0])
    disk_first.close()


@pytest.mark.parametrize("cap", [0, -1, 1.5, True, None, "1G"])
def test_bad_capacity_rejected_at_construction(cap, tmp_path):
    with pytest.raises((ValueError, TypeError), match="capacity_bytes"):
        CPUTier(cap)
    with pytest.raises((ValueError, TypeError), match="capacity_bytes"):
        DiskTier(tmp_path, cap)


def test_bad_config_rejected_at_construction(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        DiskTier(afile / "sub", 1 << 20)
    with pytest.raises(TypeError, match="path"):
        DiskTier(123, 1 << 20)
    with pytest.raises((ValueError, TypeError), match="swap_bytes"):
        CPUTier(1 << 20, swap_bytes=-1)
    for url in ["http://localhost:6379", "localhost:6379", "redis://", "redis://h:99999999"]:
        with pytest.raises(ValueError):
            RedisTier(url)
    with pytest.raises(TypeError, match="url"):
        RedisTier(6379)
    with pytest.raises(ValueError, match="timeout_s"):
        RedisTier("redis://localhost", timeout_s=0)
    with pytest.raises(ValueError, match="retry_max_s"):
        RedisTier("redis://localhost", retry_initial_s=2, retry_max_s=1)
    with pytest.raises(ValueError, match="cannot hold one KV block"):
        TieredStore([CPUTier(BPB - 1)], LAYOUT, "m")
    with pytest.raises(ValueError, match="cannot hold one framed KV block"):
        TieredStore([DiskTier(tmp_path, BPB)], LAYOUT, "m")
    with pytest.raises(TypeError, match="non-empty list"):
        TieredStore([], LAYOUT, "m")
    with pytest.raises(TypeError, match="CPUTier, DiskTier or RedisTier"):
        TieredStore(["cpu"], LAYOUT, "m")
    with pytest.raises(ValueError, match="put it last"):
        TieredStore([RedisTier("redis://localhost"), CPUTier(4 * BPB)], LAYOUT, "m")
    ts = TieredStore([CPUTier(4 * BPB)], LAYOUT, "m")
    with pytest.raises(RuntimeError, match="attach"):
        ts.promote(hashes(1), [0])
    with pytest.raises(ValueError, match="layout"):
        ts.attach(KVPool(KVLayout(1, 2, 8, 4), 4))
    ts.close()
    shown = repr(RedisTier("redis://:secret@localhost", password="p2"))
    assert "secret" not in shown and "p2" not in shown and "redis://:***@localhost" in shown


def test_unwritable_disk_path_is_a_clear_error(tmp_path, monkeypatch):
    # root passes every permission check, so simulate an unwritable parent directory
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="not writable"):
        DiskTier(tmp_path / "kv", 1 << 20)


class FlakyStore:
    """A store whose every call fails while ``down`` is set (a dying disk, a lost server)."""

    def __init__(self, inner):
        self.inner = inner
        self.down = False
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in ("stats", "close", "capacity_bytes") or not callable(attr):
            return attr

        def call(*a, **kw):
            self.calls += 1
            if self.down:
                raise StoreError("injected failure")
            return attr(*a, **kw)

        return call


def test_failing_tier_is_a_miss_logged_once_and_retried_with_backoff(tmp_path, caplog):
    now = [0.0]
    ts = chain([CPUTier(2 * BPB), DiskTier(tmp_path, 64 * (BPB + 64))])
    disk = ts.levels[1]
    disk.store = FlakyStore(disk.store)
    disk.backoff = Backoff("disk", initial_seconds=1.0, max_seconds=4.0, clock=lambda: now[0])
    hs = hashes(3)
    before = torch.cat([evict_into(ts, [i], [hs[i]]) for i in range(3)])  # hs[0] -> disk
    ts.flush()
    disk.store.down = True
    caplog.set_level(logging.DEBUG, logger="pagedkv.tiers")
    scribble(ts._transfer.pool)
    assert ts.promote(hs, [5, 6, 7]) == 0  # hs[0] only on the failing disk: a miss
    calls = disk.store.calls
    for _ in range(5):  # inside the back-off window the tier is not even tried
        assert ts.promote(hs, [5, 6, 7]) == 0
    assert disk.store.calls == calls
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disk" in warnings[0].getMessage()
    now[0] = 1.5  # retry: still down, next wait doubles
    assert ts.promote(hs, [5, 6, 7]) == 0 and disk.store.calls == calls + 1
    now[0] = 2.5
    assert ts.promote(hs, [5, 6, 7]) == 0 and disk.store.calls == calls + 1
    disk.store.down = False
    now[0] = 4.0
    assert ts.promote(hs, [5, 6, 7]) == 3
    assert torch.equal(ts._transfer.pool.read_blocks([5, 6, 7]), before)
    st = ts.stats()["tiers"]["disk"]
    assert st["available"] and st["errors"] >= 2
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 2  # down once, back once
    ts.close()


def test_backoff_doubles_up_to_the_ceiling():
    now = [0.0]
    b = Backoff("t", initial_seconds=0.5, max_seconds=2.0, clock=lambda: now[0])
    waits = []
    for _ in range(5):
        b.failure(OSError("x"))
        start = now[0]
        while not b.ready():
            now[0] += 0.25
        waits.append(now[0] - start)
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0]
    b.success()
    assert b.ready() and not b.down and b.outages == 1 and b.errors == 5
    with pytest.raises(ValueError):
        Backoff("t", initial_seconds=0)


def test_random_operations_against_a_model(tmp_path):
    """Random demote / promote / swap traffic: every hit is bit-exact with what was evicted."""
    import random

    rng = random.Random(7)
    pool = make_pool(16)
    ts = chain([CPUTier(3 * BPB, swap_bytes=4 * BPB), DiskTier(tmp_path, 6 * (BPB + 64))], pool)
    written: dict[bytes, torch.Tensor] = {}
    swapped: dict[str, torch.Tensor] = {}
    for step in range(150):
        op = rng.random()
        if op < 0.45:
            ids = rng.sample(range(16), rng.randint(1, 4))
            hs = [hashlib.sha256(f"{step}-{i}".encode()).digest() for i in ids]
            pool.write_blocks(ids, torch.randint(0, 255, (len(ids), BPB), dtype=torch.uint8))
            before = evict_into(ts, ids, hs)
            written.update({h: before[j] for j, h in enumerate(hs)})
        elif op < 0.8 and written:
            hs = rng.sample(list(written), min(len(written), rng.randint(1, 4)))
            ids = rng.sample(range(16), len(hs))
            n = ts.promote(hs, ids)
            got = pool.read_blocks(ids[:n])
            for j in range(n):
                assert torch.equal(got[j], written[hs[j]]), f"step {step}: block {j} differs"
        elif op < 0.9 and len(swapped) < 2:
            ids = rng.sample(range(16), 2)
            key = f"s{step}"
            swapped[key] = pool.read_blocks(ids).clone()
            ts.swap_out(key, ids)
        elif swapped:
            key = rng.choice(list(swapped))
            ids = rng.sample(range(16), 2)
            ts.swap_in(key, ids)
            assert torch.equal(pool.read_blocks(ids), swapped.pop(key))
        if step % 10 == 0:
            ts.flush()
            ts.check_integrity()
    ts.close()


# -- end to end through KVCache ---------------------------------------------------------


def _fill(cache, seq_id, seed):
    """Write random KV into every block of ``seq_id`` (what a forward pass would do)."""
    table = cache.block_table(seq_id)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (len(table), BPB), dtype=torch.uint8, generator=g)
    cache.write_blocks(table, data)
    return data


def test_kvcache_demotes_on_eviction_and_promotes_on_prefix_hit(tmp_path):
    from pagedkv.cache import KVCache

    cache = KVCache(LAYOUT, 4, tiers=[CPUTier(2 * BPB), DiskTier(tmp_path, 16 * (BPB + 64))])
    prompt_a = list(range(100, 113))  # 13 tokens: 3 full blocks + 1 partial
    prompt_b = list(range(200, 213))
    assert cache.allocate("a", prompt_a) == 0
    data_a = _fill(cache, "a", 1)
    cache.free("a")
    assert cache.allocate("b", prompt_b) == 0  # the tiny pool evicts a's cached blocks
    _fill(cache, "b", 2)
    cache.free("b")
    cache.tiers.flush()
    st = cache.tier_stats()
    assert st["demoted"] == 3 and st["tiers"]["cpu"]["spilled"] == 1
    assert cache.allocate("c", prompt_a) == 12  # 3 blocks from the tiers, 1 token to compute
    assert torch.equal(cache.read_blocks(cache.block_table("c")[:3]), data_a[:3])
    st = cache.tier_stats()
    assert st["tier_hit_tokens"] == 12
    assert st["tiers"]["cpu"]["hits"] + st["tiers"]["disk"]["hits"] == 3
    assert st["tiers"]["disk"]["hits"] == 1  # the oldest block had spilled to disk
    cache.free("c")
    assert cache.allocate("d", prompt_a, salt="tenant-2") == 0  # another salt: no hit
    cache.check_integrity()
    cache.close()


def test_kvcache_swap_out_in_bit_exact():
    from pagedkv.cache import KVCache

    cache = KVCache(LAYOUT, 8, tiers=[CPUTier(4 * BPB, swap_bytes=8 * BPB)])
    cache.allocate("s", list(range(1, 19)))  # 5 blocks
    data = _fill(cache, "s", 3)
    cache.swap_out("s")
    assert "s" not in cache and cache.tier_stats()["swapped_bytes"] == 5 * BPB
    cache.allocate("x", list(range(500, 530)))  # reuse the pool while "s" is out
    _fill(cache, "x", 4)
    cache.free("x")
    cache.swap_in("s")
    assert torch.equal(cache.read_blocks(cache.block_table("s")), data)
    assert cache.token_ids("s") == list(range(1, 19))
    assert cache.tier_stats()["swapped_bytes"] == 0
    cache.swap_out("s")  # its full blocks stay cached on the device: swap_in reuses them
    cache.swap_in("s")
    assert torch.equal(cache.read_blocks(cache.block_table("s")), data)
    cache.check_integrity()
    cache.close()


def test_idle_writer_thread_exits_and_restarts(monkeypatch):
    import time

    from pagedkv.tiers import writeback

    monkeypatch.setattr(writeback, "IDLE_EXIT_SECONDS", 0.02)
    ts = chain([CPUTier(8 * BPB)])
    hs = hashes(2)
    evict_into(ts, [0], hs[:1])
    ts.flush()
    deadline = time.monotonic() + 5
    while ts._writer._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ts._writer._thread is None
    evict_into(ts, [1], hs[1:])  # a new thread stores this one
    ts.flush()
    assert ts.promote(hs, [5, 6]) == 2 and ts.stats()["tiers"]["cpu"]["puts"] == 2
    ts.close()


def test_write_back_waits_while_a_lookup_runs():
    from pagedkv.tiers.writeback import WriteBack

    wb = WriteBack(lambda job: None, 1 << 20)
    passed = threading.Event()
    with wb.reading():
        t = threading.Thread(target=lambda: (wb.yield_to_readers(), passed.set()))
        t.start()
        assert not passed.wait(0.1)  # the writer is held while the lookup runs
    assert passed.wait(5)
    t.join()
    wb.close()


def test_kvcache_serves_with_redis_unreachable_from_the_start(caplog):
    import socket

    from pagedkv.cache import KVCache

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tier = RedisTier(f"redis://127.0.0.1:{port}/0", timeout_s=0.2, retry_initial_s=0.05)
    cache = KVCache(LAYOUT, 4, tiers=[tier])
    with caplog.at_level(logging.WARNING, logger="pagedkv.tiers"):
        for i in range(6):  # evictions go nowhere, lookups miss, nothing raises
            assert cache.allocate(i, list(range(100 * i, 100 * i + 13))) == 0
            data = _fill(cache, i, i)
            assert torch.equal(cache.read_blocks(cache.block_table(i)), data)
            cache.free(i)
        cache.tiers.flush()
    st = cache.tier_stats()["tiers"]["redis"]
    assert not st["available"] and st["hits"] == 0 and st["errors"] >= 1
    assert sum("redis" in r.getMessage() for r in caplog.records) == 1  # logged once
    cache.close()


def test_redis_tier_takes_seconds_names_and_their_older_s_names():
    import dataclasses

    new = RedisTier("redis://localhost", timeout_seconds=0.2, retry_initial_seconds=0.1,
                    retry_max_seconds=3.0)  # fmt: skip
    old = RedisTier("redis://localhost", timeout_s=0.2, retry_initial_s=0.1, retry_max_s=3.0)
    assert new == old and old.timeout_seconds == 0.2 and old.retry_max_seconds == 3.0
    assert RedisTier("redis://localhost").retry_initial_seconds == 0.5  # defaults unchanged
    assert dataclasses.replace(old, timeout_seconds=1.0).timeout_seconds == 1.0
    assert "timeout_seconds=0.2" in repr(old)
    with pytest.raises(TypeError, match="timeout_seconds or timeout_s"):
        RedisTier("redis://localhost", timeout_seconds=1.0, timeout_s=1.0)
    with pytest.raises(ValueError, match="retry_initial_seconds"):
        RedisTier("redis://localhost", retry_initial_s=-1)


def test_stats_are_dataclasses_read_as_mappings_too():
    from pagedkv.tiers import ChainStats, TierStats

    ts = chain([CPUTier(8 * BPB)])
    evict_into(ts, [0, 1], hashes(2))
    ts.flush()
    st = ts.stats()
    assert isinstance(st, ChainStats) and isinstance(st.tiers["cpu"], TierStats)
    assert st.demoted == st["demoted"] == 2 and st.tiers["cpu"].puts == st["tiers"]["cpu"]["puts"]
    assert st.lost_blocks == 0 and st["pending_bytes"] == 0
    as_dict = {"extra": 1, **st}  # how KVCache.tier_stats() merges them
    assert as_dict["tiers"]["cpu"]["entries"] == 2 and set(st) <= set(as_dict)
    assert dict(st.tiers["cpu"]) == st.tiers["cpu"]  # equal to the dict of its fields
    with pytest.raises(KeyError):
        st["no-such-counter"]
    import json

    assert json.loads(json.dumps(st.to_dict())) == st  # plain dicts all the way down
    ts.close()
