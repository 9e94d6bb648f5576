"""KVCacheGroup across real devices: every ordered pair among ``cpu`` and ``cuda:i``.

One GPU gives cpu -> cuda:0 and cuda:0 -> cpu; two give cuda:0 <-> cuda:1 as well. The
staging chunk is a few blocks, so every pipelined route runs many chunks through its
double buffers. Without CUDA the tests are collected and skipped (``gpu`` marker).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from _groupcases import assert_kv, assert_same_state, group_state, write_kv
from pagedkv import KVCacheGroup, KVLayout, OutOfBlocks, ops
from pagedkv.storage import KVPool, pool_copy

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(GPUS)]
PAIRS = list(itertools.permutations(DEVICES, 2)) or [("cpu", "cuda:0")]  # skipped on CPU
LAYOUT = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)  # 256 KiB blocks
CHUNK = 3 * LAYOUT.bytes_per_block


def group_for(devices, num_blocks: int = 96) -> KVCacheGroup:
    return KVCacheGroup.create(LAYOUT, num_blocks, list(devices), chunk_bytes=CHUNK)


def scattered(group: KVCacheGroup, member: str, seq_id, n_tokens: int, salt=None) -> None:
    """A sequence whose blocks lie scattered in the pool, holding random bytes."""
    cache = group.member(member)
    fillers = [f"fill-{seq_id}-{i}" for i in range(12)]
    for f in fillers:
        cache.allocate(f, [i % 7 for i in range(5)])  # one partial block each: no caching
    for f in fillers[::2]:
        cache.free(f)
    for f in fillers[1::2]:
        cache.free(f)
    group.allocate(seq_id, list(range(3, 3 + n_tokens)), salt, device=member)
    cache.pool.kv.view(torch.uint8).random_()


def blocks_of(group: KVCacheGroup, seq_id) -> torch.Tensor:
    return group.cache_of(seq_id).read_blocks(group.block_table(seq_id)).clone()


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_move_is_bit_exact_on_every_route(pair):
    a, b = pair
    g = group_for(pair)
    scattered(g, a, "s", 20 * 16 + 5, salt="t")  # 21 blocks: 7 chunks
    before = blocks_of(g, "s")
    r = g.move("s", b)
    assert r.route == pool_copy.route(torch.device(a), torch.device(b))
    assert (r.blocks_copied, r.blocks_reused) == (21, 0)
    if r.route == "peer":
        assert r.peer == torch.cuda.can_device_access_peer(int(a[-1]), int(b[-1]))
    assert torch.equal(blocks_of(g, "s"), before)
    # back: the 20 full blocks are still cached at the source, only the last one moves
    back = g.move("s", a)
    assert (back.blocks_copied, back.blocks_reused) == (1, 20)
    assert torch.equal(blocks_of(g, "s"), before)
    g.check_integrity()


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_prefix_on_the_target_is_reused_and_kv_follows_the_tokens(pair):
    a, b = pair
    g = group_for(pair)
    system = list(range(100, 100 + 4 * 16))
    for sid, member, tail in (("x", b, [1, 2]), ("y", a, list(range(7, 40)))):
        cached = g.allocate(sid, system + tail, device=member)
        write_kv(g.cache_of(sid), sid, cached)
    r = g.move("y", b)
    assert (r.blocks_reused, r.blocks_copied) == (4, 3)
    assert g.block_table("y")[:4] == g.block_table("x")[:4]
    for sid in ("x", "y"):
        assert_kv(g, sid)
    g.check_integrity()


def _fail_on_second(monkeypatch, target: str) -> list:
    """Make the copy's second write into the target fail (mid-way through the chunks)."""
    calls: list = []
    if target == "cpu":
        real = KVPool.write_blocks

        def write(self, *args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected copy failure")
            return real(self, *args, **kw)

        monkeypatch.setattr(KVPool, "write_blocks", write)
    else:
        real = ops.scatter_blocks

        def scatter(*args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected copy failure")
            return real(*args, **kw)

        monkeypatch.setattr(ops, "scatter_blocks", scatter)
    return calls


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_failed_copy_changes_nothing(pair, monkeypatch):
    a, b = pair
    g = group_for(pair)
    scattered(g, a, "s", 10 * 16)
    g.allocate("resident", list(range(50, 90)), device=b)
    before, moving = group_state(g), blocks_of(g, "s")
    calls = _fail_on_second(monkeypatch, b)
    with pytest.raises(RuntimeError, match="injected"):
        g.move("s", b)
    assert len(calls) == 2
    monkeypatch.undo()
    assert_same_state(before, group_state(g))
    g.check_integrity()
    g.move("s", b)  # and once the copy works, the move goes through
    assert torch.equal(blocks_of(g, "s"), moving)
    g.check_integrity()


@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_out_of_blocks_on_the_target_changes_nothing(pair):
    a, b = pair
    g = KVCacheGroup.create(LAYOUT, [64, 4], list(pair), chunk_bytes=CHUNK)
    scattered(g, a, "s", 8 * 16)
    before = group_state(g)
    with pytest.raises(OutOfBlocks):
        g.move("s", b)
    assert_same_state(before, group_state(g))


@pytest.mark.skipif(GPUS < 1, reason="needs a GPU")
def test_two_pools_on_one_gpu_use_the_device_route():
    g = group_for(["cuda:0", "cuda:0"])
    scattered(g, "cuda:0#0", "s", 9 * 16)
    before = blocks_of(g, "s")
    r = g.move("s", "cuda:0#1")
    assert r.route == "device" and torch.equal(blocks_of(g, "s"), before)
    g.check_integrity()


@pytest.mark.parametrize("devices", [DEVICES if len(DEVICES) > 2 else PAIRS[0]], ids=",".join)
def test_rebalance_and_affinity_across_all_devices(devices):
    g = group_for(devices, num_blocks=48)
    first = g.supported_devices()[0]
    for i in range(10):
        cached = g.allocate(f"s{i}", [i + 1] * (16 * (1 + i % 4) + 3), device=first)
        write_kv(g.cache_of(f"s{i}"), f"s{i}", cached)
    moves = g.rebalance(0.1)
    assert moves and all(m.source == first for m in moves)
    fracs = [s.used_fraction for s in g.device_stats().values()]
    assert max(fracs) - min(fracs) <= 0.1 + 5 / 48  # within the spread, up to one sequence
    for sid in g.seq_ids():
        assert_kv(g, sid)
    # affinity: a prompt whose prefix only the last member caches goes there
    last, prompt = g.supported_devices()[-1], list(range(500, 548))
    g.allocate("p", prompt, device=last)
    g.free("p")
    assert g.allocate("again", prompt + [9]) == 48 and g.device_of("again") == last
    assert g.device_stats()[last].prefix_hits == 1
    g.check_integrity()
