"""Tiers across processes: prefixes shared through Redis, a disk tier surviving kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pagedkv.storage import KVLayout, KVPool
from pagedkv.tiers import DiskTier, TieredStore

SRC = str(Path(__file__).resolve().parents[1] / "src")

SHARE = textwrap.dedent(
    """
    import hashlib, json, sys, torch
    from pagedkv.cache import KVCache
    from pagedkv.storage import KVLayout
    from pagedkv.tiers import RedisTier

    role, url = sys.argv[1:3]
    layout = KVLayout(2, 2, 8, 4, torch.bfloat16)
    prompt = list(range(1000, 1013))  # 3 full blocks + 1 token
    out = {}
    if role == "writer":
        cache = KVCache(layout, 4, model_fingerprint="model-a", tiers=[RedisTier(url)])
        cache.allocate("p", prompt)
        table = cache.block_table("p")
        g = torch.Generator().manual_seed(1234)
        data = torch.randint(0, 256, (len(table), layout.bytes_per_block), dtype=torch.uint8,
                             generator=g)
        cache.write_blocks(table, data)  # stands in for the prefill forward pass
        cache.free("p")
        cache.allocate("other", list(range(5000, 5016)))  # evicts the prompt into Redis
        out["digest"] = hashlib.sha256(data[:3].numpy().tobytes()).hexdigest()
        cache.close()
    else:
        for fingerprint in ("model-a", "model-b"):
            cache = KVCache(layout, 4, model_fingerprint=fingerprint, tiers=[RedisTier(url)])
            cached = cache.allocate("p", prompt)
            blocks = cache.block_table("p")[: cached // 4]
            digest = hashlib.sha256(cache.read_blocks(blocks).numpy().tobytes()).hexdigest()
            hits = cache.tier_stats()["tiers"]["redis"]["hits"]
            out[fingerprint] = {"cached": cached, "digest": digest, "redis_hits": hits}
            cache.close()
    print(json.dumps(out))
    """
)


def _run(code: str, *args: str, timeout: float = 60) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.redis
def test_two_processes_share_a_prefix_through_redis(redis_url):
    wrote = _run(SHARE, "writer", redis_url)
    read = _run(SHARE, "reader", redis_url)
    same, other = read["model-a"], read["model-b"]
    assert same["cached"] == 12 and same["redis_hits"] == 3
    assert same["digest"] == wrote["digest"]  # bit-exact across processes
    assert other["cached"] == 0 and other["redis_hits"] == 0  # another model: no hit


# A block's bytes are a function of its index, so a reader can check any entry.
LAYOUT = KVLayout(4, 4, 64, 16, torch.bfloat16)  # 64 KiB per block

WRITER = textwrap.dedent(
    """
    import hashlib, sys, torch
    from pagedkv.storage import KVLayout, KVPool
    from pagedkv.tiers import DiskTier, TieredStore

    layout = KVLayout(4, 4, 64, 16, torch.bfloat16)
    pool = KVPool(layout, 8)
    ts = TieredStore([DiskTier(sys.argv[1], 1 << 30)], layout, "crash")
    ts.attach(pool)
    i = 0
    while True:
        g = torch.Generator().manual_seed(i)
        data = torch.randint(0, 256, (1, layout.bytes_per_block), dtype=torch.uint8, generator=g)
        pool.write_blocks([i % 8], data)
        ts.demote([(i % 8, hashlib.sha256(str(i).encode()).digest())])
        if i == 20:
            ts.flush()
            print("ready", flush=True)
        i += 1
    """
)


def _expected(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, 256, (1, LAYOUT.bytes_per_block), dtype=torch.uint8, generator=g)


def test_disk_tier_survives_a_writer_killed_mid_write(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # the writer is somewhere inside a put now
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written = len(list(tmp_path.rglob("*.v")))
    assert written > 20
    pool = KVPool(LAYOUT, 4)
    ts = TieredStore([DiskTier(tmp_path, 1 << 30)], LAYOUT, "crash")
    ts.attach(pool)
    assert not list(tmp_path.rglob("*.tmp"))  # the dead writer's temp files are gone
    found = 0
    for i in range(written + 50):
        h = hashlib.sha256(str(i).encode()).digest()
        if ts.promote([h], [0]) == 1:
            found += 1
            assert torch.equal(pool.read_blocks([0]), _expected(i)), f"entry {i} differs"
    st = ts.stats()["tiers"]["disk"]
    assert found >= 21 and st["corrupt"] == 0  # never a partial entry
    h = hashlib.sha256(b"after").digest()  # the directory is still usable
    pool.write_blocks([1], _expected(10**6))
    ts.demote([(1, h)])
    ts.flush()
    assert ts.promote([h], [2]) == 1
    assert torch.equal(pool.read_blocks([2]), _expected(10**6))
    ts.close()
