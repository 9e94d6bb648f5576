"""The Redis tier against a real redis-server: round trips, outages, corruption, isolation."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from _tiercases import BPB, LAYOUT, chain, hashes
from pagedkv.manager import BlockManager
from pagedkv.tiers import CPUTier, RedisTier, TieredStore

pytestmark = pytest.mark.redis

FAST = {"timeout_s": 0.2, "retry_initial_s": 0.05, "retry_max_s": 0.2}


def demote(ts: TieredStore, ids, hs) -> torch.Tensor:
    before = ts._transfer.pool.read_blocks(ids).clone()
    ts.demote(list(zip(ids, hs)))
    ts.flush()
    return before


def test_round_trip_and_spill_from_cpu(redis_url):
    ts = chain([CPUTier(2 * BPB), RedisTier(redis_url, **FAST)])
    hs = hashes(5)
    before = torch.cat([demote(ts, [i], [hs[i]]) for i in range(5)])
    st = ts.stats()["tiers"]
    assert st["cpu"]["spilled"] == 3 and st["redis"]["puts"] == 3
    ts._transfer.pool.kv.zero_()
    assert ts.promote(hs, [10, 11, 12, 13, 14]) == 5
    assert torch.equal(ts._transfer.pool.read_blocks([10, 11, 12, 13, 14]), before)
    st = ts.stats()["tiers"]
    assert (st["redis"]["hits"], st["cpu"]["hits"]) == (3, 2)
    ts.close()
    only = chain([RedisTier(redis_url, **FAST)])  # a fresh cache finds them in Redis
    assert only.promote(hs[:3], [0, 1, 2]) == 3
    assert torch.equal(only._transfer.pool.read_blocks([0, 1, 2]), before[:3])
    only.close()


def test_kill_mid_workload_then_restart(redis_server, redis_url, caplog):
    caplog.set_level(logging.INFO, logger="pagedkv.tiers")
    ts = chain([RedisTier(redis_url, **FAST)])
    hs = hashes(40, "w")
    hits = 0
    for step in range(40):
        if step == 15:
            redis_server.kill()
        ids = [step % 16, (step + 1) % 16]
        demote(ts, ids[:1], [hs[step]])
        hits += ts.promote([hs[max(0, step - 1)]], ids[1:])  # no exception, ever
    assert hits == 15  # steps 0..14 hit, everything after the kill is a miss
    st = ts.stats()["tiers"]["redis"]
    assert not st["available"] and st["errors"] >= 1
    down = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(down) == 1 and "redis" in down[0].getMessage()
    redis_server.start()  # data is gone (no persistence); new entries must hit again
    deadline = time.monotonic() + 5
    fresh = hashes(1, "after")
    while time.monotonic() < deadline:
        demote(ts, [3], fresh)
        if ts.promote(fresh, [4]) == 1:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the Redis tier did not come back after the restart")
    assert torch.equal(ts._transfer.pool.read_blocks([4]), ts._transfer.pool.read_blocks([3]))
    assert ts.stats()["tiers"]["redis"]["available"]
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 2  # down, back
    ts.close()


def test_slow_redis_is_a_bounded_miss(redis_server, redis_url):
    ts = chain([CPUTier(BPB), RedisTier(redis_url, **FAST)])
    hs = hashes(3)
    for i in range(3):
        demote(ts, [i], [hs[i]])
    redis_server.pause()
    try:
        t0 = time.monotonic()
        assert ts.promote(hs, [5, 6, 7]) == 0  # hs[0] is only in the paused Redis
        for i in range(3, 8):  # demotions spill into the paused server: dropped, no error
            demote(ts, [i], hashes(8, "p")[i : i + 1])
        assert time.monotonic() - t0 < 3.0
        assert not ts.stats()["tiers"]["redis"]["available"]
    finally:
        redis_server.resume()
    time.sleep(0.25)
    assert ts.promote(hs[:2], [5, 6]) == 2  # still in Redis, reachable again
    ts.close()


def test_corrupted_value_is_a_miss_and_deleted(redis_url):
    import redis

    ts = chain([RedisTier(redis_url, **FAST)])
    hs = hashes(3)
    demote(ts, [0, 1, 2], hs)
    raw = redis.Redis.from_url(redis_url)
    name = "pagedkv:" + ts.key(hs[1])
    value = bytearray(raw.get(name))
    value[len(value) // 2] ^= 0x40
    raw.set(name, bytes(value))
    assert ts.promote(hs, [5, 6, 7]) == 1
    assert ts.stats()["tiers"]["redis"]["corrupt"] == 1 and raw.exists(name) == 0
    raw.set("pagedkv:" + ts.key(hs[0]), b"short")  # truncated / foreign value
    assert ts.promote(hs, [5, 6, 7]) == 0
    assert ts.stats()["tiers"]["redis"]["corrupt"] == 2
    raw.close()
    ts.close()


def test_other_fingerprint_or_salt_never_hits(redis_url):
    manager = BlockManager(16, LAYOUT.block_size)
    prompt = list(range(40, 57))
    plain = manager.hash_blocks(prompt)
    salted = manager.hash_blocks(prompt, salt="tenant-b")
    a = chain([RedisTier(redis_url, **FAST)], fingerprint="model-a")
    demote(a, [0, 1, 2, 3], plain)
    assert a.promote(salted, [4, 5, 6, 7]) == 0
    b = chain([RedisTier(redis_url, **FAST)], fingerprint="model-b")
    assert b.promote(plain, [4, 5, 6, 7]) == 0
    assert a.promote(plain, [4, 5, 6, 7]) == 4
    a.close()
    b.close()
