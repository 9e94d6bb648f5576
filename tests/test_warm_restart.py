"""Warm restarts: ``close(persist=True)`` writes the device's cached blocks (and the CPU
tier's) to the persistent tier; a new process with the same tiers and model hits them,
with identical output; a process killed mid-persist leaves only complete entries."""

from __future__ import annotations

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

from _models import tiny
from pagedkv import KVCache
from pagedkv.engine import Engine, SamplingParams
from pagedkv.storage import KVLayout
from pagedkv.tiers import CPUTier, DiskTier, RedisTier

pytestmark = pytest.mark.usefixtures("single_thread")

TESTS = str(Path(__file__).resolve().parent)
SRC = str(Path(__file__).resolve().parents[1] / "src")
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
BS = 8  # engine block size
NEW = 6
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def prompts(n: int, length: int, seed: int, shared: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 256, (shared,), generator=g).tolist()
    return [system + torch.randint(3, 256, (length,), generator=g).tolist() for _ in range(n)]


def full_blocks(prompt: list[int], bs: int) -> int:
    """Prompt tokens a prefix hit can serve: full blocks, one token left to compute."""
    return (len(prompt) - 1) // bs * bs


# -- in one process: what close(persist=True) writes -------------------------------------


def _serve(cache: KVCache, seqs: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Allocate each prompt, write random KV into its blocks, free it; the KV written."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for sid, toks in seqs.items():
        cache.allocate(sid, toks)
        table = cache.block_table(sid)
        data = torch.randint(0, 256, (len(table), LAYOUT.bytes_per_block), dtype=torch.uint8,
                             generator=g)  # fmt: skip
        cache.write_blocks(table, data)
        out[sid] = data[: len(toks) // LAYOUT.block_size]
        cache.free(sid)
    return out


def test_persist_writes_device_and_cpu_blocks_and_a_new_cache_hits_them(tmp_path):
    bpb = LAYOUT.bytes_per_block
    tiers = [CPUTier(8 * bpb), DiskTier(tmp_path / "kv", 256 * bpb)]
    seqs = {f"p{i}": list(range(i * 100, i * 100 + 17)) for i in range(4)}  # 4 full blocks
    a = KVCache(LAYOUT, 12, model_fingerprint="m", tiers=tiers)
    written = _serve(a, seqs, seed=0)
    a.allocate("live", list(range(5000, 5009)))  # a live sequence's blocks are not written
    a.flush()
    st = a.tier_stats()
    assert st["demoted"] == 7 and st["tiers"]["disk"]["puts"] == 0  # 7 in CPU, 9 on device
    a.close(persist=True)
    assert a.tier_stats()["persisted"] == 16
    b = KVCache(LAYOUT, 32, model_fingerprint="m", tiers=tiers)
    for sid, toks in seqs.items():
        assert b.allocate(sid, toks) == 16, sid  # every full block, from the disk tier
        got = b.read_blocks(b.block_table(sid)[:4])
        assert torch.equal(got, written[sid]), sid
    assert b.allocate("live", list(range(5000, 5009))) == 0
    assert b.tier_stats()["tiers"]["disk"]["hits"] == 16
    b.check_integrity()
    b.close()
    other = KVCache(LAYOUT, 32, model_fingerprint="other", tiers=tiers)
    assert other.allocate("p0", seqs["p0"]) == 0  # another model never hits
    other.close()


def test_persist_needs_a_persistent_tier_and_changes_nothing_otherwise(tmp_path):
    cpu_only = KVCache(LAYOUT, 8, tiers=[CPUTier(4 * LAYOUT.bytes_per_block)])
    _serve(cpu_only, {"a": list(range(9))}, seed=1)
    with pytest.raises(ValueError, match="DiskTier or RedisTier"):
        cpu_only.close(persist=True)
    assert cpu_only.allocate("b", list(range(9))) == 8  # still open, still caching
    cpu_only.close()
    bare = KVCache(LAYOUT, 8)
    with pytest.raises(ValueError, match="persistent tier"):
        bare.close(persist=True)
    with pytest.raises(TypeError, match="persist"):
        bare.close(persist="yes")
    bare.close()
    disk = KVCache(LAYOUT, 8, tiers=[DiskTier(tmp_path, 1 << 20)])
    disk.close()
    with pytest.raises(ValueError, match="closed"):  # persisting after close is too late
        disk.close(persist=True)
    disk.close()  # closing again is fine


def test_engine_close_persist_without_a_persistent_tier_leaves_it_open():
    engine = Engine(tiny("llama"), num_blocks=32, block_size=BS, tiers=[CPUTier(1 << 20)])
    batch = prompts(2, 9, seed=5)
    first = engine.generate(batch, GREEDY)
    with pytest.raises(ValueError, match="DiskTier or RedisTier"):
        engine.close(persist=True)
    assert not engine.closed
    again = engine.generate(batch, GREEDY)  # still serving, and still caching
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    assert all(o.num_cached_tokens > 0 for o in again)
    engine.close()
    assert engine.closed
    engine.close(persist=True)  # closed already: nothing to do (idempotent)


def test_persist_into_a_full_disk_tier_keeps_the_most_recent(tmp_path):
    bpb = LAYOUT.bytes_per_block
    from pagedkv.stores.framing import HEADER_BYTES

    tiers = [DiskTier(tmp_path, 6 * (bpb + HEADER_BYTES))]  # room for 6 of the 12
    seqs = {f"p{i}": list(range(i * 100, i * 100 + 13)) for i in range(4)}  # 3 blocks each
    a = KVCache(LAYOUT, 16, model_fingerprint="m", tiers=tiers)
    _serve(a, seqs, seed=2)
    a.close(persist=True)
    b = KVCache(LAYOUT, 16, model_fingerprint="m", tiers=tiers)
    hits = [b.allocate(sid, toks) for sid, toks in seqs.items()]
    assert hits == [0, 0, 12, 12]  # the last two served are the most recently used
    b.close()


# -- across processes, with a real model -------------------------------------------------

SERVE = textwrap.dedent(
    """
    import json, sys, time
    from _models import tiny
    from pagedkv.engine import Engine, SamplingParams
    from pagedkv.tiers import CPUTier, DiskTier, RedisTier

    kind, where, num_blocks, slow = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    prompts, others = json.loads(sys.stdin.readline()), json.loads(sys.stdin.readline())
    import torch
    torch.set_num_threads(1)
    model = tiny("llama")
    if kind == "disk":
        tiers = [DiskTier(where, 64 << 20)]
    else:
        tiers = [CPUTier(64 * 2048), RedisTier(where)]
    engine = Engine(model, num_blocks=num_blocks, block_size=8, tiers=tiers)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    outs = engine.generate(prompts, greedy)
    engine.generate(others, greedy)  # unrelated traffic (may evict the prompts' blocks)
    stats = engine.cache.tier_stats()
    print(json.dumps({"tokens": [o.token_ids for o in outs],
                      "cached": [o.num_cached_tokens for o in outs],
                      "demoted": stats["demoted"]}), flush=True)
    if slow == "slow":  # each disk entry takes 80 ms to commit: time to kill us midway,
        # even when the test process is starved on a loaded machine (60 entries: 4.8 s)
        from pagedkv.stores import disk_layout
        commit = disk_layout.EntryFiles.commit
        def slow_commit(self, *args, **kw):
            time.sleep(0.08)
            return commit(self, *args, **kw)
        disk_layout.EntryFiles.commit = slow_commit
        print("persisting", flush=True)
    engine.close(persist=True)
    print(json.dumps({"persisted": engine.cache.tier_stats()["persisted"]}), flush=True)
    """
)


def _process_a(
    kind: str, where: str, num_blocks: int, batch: list[list[int]], others=(), slow: bool = False
) -> subprocess.Popen[str]:
    """Process A: serve ``batch`` then ``others`` on a tiny engine, print the outputs,
    close with ``persist=True`` (``slow``: each disk entry takes 80 ms)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS])}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, kind, where, str(num_blocks), "slow" if slow else "-"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc.stdin.write(json.dumps(batch) + "\n" + json.dumps(list(others)) + "\n")
    proc.stdin.flush()
    return proc


def _engine_b(tiers, num_blocks: int) -> Engine:
    return Engine(tiny("llama"), num_blocks=num_blocks, block_size=BS, tiers=tiers)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_process_b_hits_every_full_block_and_generates_the_same(kind, tmp_path, request):
    batch = prompts(4, 29, seed=3)  # 16 shared + 29 own tokens: 5 full blocks each
    if kind == "disk":
        where, num_blocks, others = str(tmp_path / "kv"), 256, []  # nothing is evicted in A
        tiers = [DiskTier(where, 64 << 20)]
    else:  # unrelated traffic evicts into A's CPU tier; persisting writes both to Redis
        where, num_blocks = request.getfixturevalue("redis_url"), 32
        others = prompts(3, 60, seed=99, shared=0)
        tiers = [CPUTier(64 * 2048), RedisTier(where)]
    a = _process_a(kind, where, num_blocks, batch, others)
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err[-3000:]
    served, closed = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert served["cached"][0] == 0  # A started cold
    if kind == "disk":
        assert served["demoted"] == 0  # every block A wrote was still on its device
    else:
        assert served["demoted"] > 0  # some only in A's CPU tier, which dies with A
    assert closed["persisted"] > 0
    b = _engine_b(tiers, 256)
    outs = b.generate(batch, GREEDY)
    assert [o.token_ids for o in outs] == served["tokens"]  # identical greedy output
    assert [o.num_cached_tokens for o in outs] == [full_blocks(p, BS) for p in batch]
    hit = b.cache.tier_stats()["tier_hit_tokens"]
    assert hit == 16 + sum(full_blocks(p, BS) - 16 for p in batch)  # shared prefix loaded once
    b.close()


@pytest.mark.slow
def test_sigkill_during_persist_leaves_only_complete_entries(tmp_path):
    where = tmp_path / "kv"
    batch = prompts(10, 45, seed=4)  # 60 full blocks to persist, 80 ms each
    a = _process_a("disk", str(where), 512, batch, slow=True)
    try:
        served = json.loads(a.stdout.readline())
        assert a.stdout.readline().strip() == "persisting"
        deadline = time.monotonic() + 60
        while len(list(where.rglob("*.v"))) < 10:  # some entries are written...
            assert time.monotonic() < deadline and a.poll() is None, a.stderr.read()[-3000:]
            time.sleep(0.01)
    finally:
        a.send_signal(signal.SIGKILL)  # ...and it dies in the middle of the rest
        a.wait()
    entries = len(list(where.rglob("*.v")))
    temps = [p for p in where.rglob("*") if p.name.startswith(".pagedkv-tmp-")]
    assert 10 <= entries < 60 and temps  # killed mid-persist, an entry half done
    b = _engine_b([DiskTier(where, 64 << 20)], 512)
    assert not [p for p in where.rglob("*") if p.name.startswith(".pagedkv-tmp-")]
    framed = b.cache.tiers.levels[0].store
    keys = list(framed.keys())
    assert len(keys) == entries and all(v is not None for v in framed.get_many(keys))
    assert framed.stats().corrupt == 0  # every entry verifies
    outs = b.generate(batch, GREEDY)
    assert [o.token_ids for o in outs] == served["tokens"]  # still correct
    # and warm for what was written: newest first, so the shared prefix made it
    assert all(o.num_cached_tokens >= 16 for o in outs), [o.num_cached_tokens for o in outs]
    b.close()
