"""KVCacheGroup across real devices: every ordered pair among ``cpu`` and ``cuda:i``.

One GPU gives cpu -> cuda:0 and cuda:0 -> cpu; two give cuda:0 <-> cuda:1 as well. The
staging chunk is a few blocks, so every pipelined route runs many chunks through its
buffers. cpu <-> cuda moves run both ways they can go: ``direct`` (the CPU pool
page-locked, pitched copies pool to pool) and ``host`` (host threads through pinned rows).
Without CUDA the tests are collected and skipped (``gpu`` marker).
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from _groupcases import assert_kv, assert_same_state, group_state, write_kv
from pagedkv import KVCacheGroup, KVLayout, OutOfBlocks, ops
from pagedkv.storage import cudart, host_device, pool_copy
from pagedkv.storage.host_threads import THREAD_NAME, HostThreads

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(GPUS)]
PAIRS = list(itertools.permutations(DEVICES, 2)) or [("cpu", "cuda:0")]  # skipped on CPU
CPU_GPU = [p for p in PAIRS if "cpu" in p]
LAYOUT = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)  # 256 KiB blocks
CHUNK = 3 * LAYOUT.bytes_per_block
STAGINGS = ["kernel", "direct", "host"]


def group_for(devices, num_blocks: int = 96, **options) -> KVCacheGroup:
    return KVCacheGroup.create(LAYOUT, num_blocks, list(devices), chunk_bytes=CHUNK, **options)


def staged(staging: str, threads: int = 3) -> dict:
    """Group options for one way of cpu <-> cuda moves."""
    if staging in ("kernel", "direct"):
        return {"staging": staging, "pin_host": True}
    return {"staging": "host", "pin_host": False, "host_threads": threads}


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


def _fail_on_call(monkeypatch, owner, name: str, nth: int = 2) -> list:
    """Make the ``nth`` call of ``owner.name`` raise (the second: mid-way through the
    chunks / runs)."""
    calls: list = []
    real = getattr(owner, name)

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == nth:
            raise RuntimeError("injected copy failure")
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, failing)
    return calls


def _write_into_target(route: str, staging: str | None) -> tuple[object, str]:
    """The call that writes a chunk (or run) into the target, per route and staging."""
    if staging == "kernel":  # one launch moves every block
        return host_device, "copy_blocks_across"
    if staging == "direct":
        return cudart.CudaRuntime, "memcpy_2d"
    if route == "d2h":
        return HostThreads, "scatter"
    return ops, "scatter_blocks"


FAILURE_CASES = [(p, None) for p in PAIRS if "cpu" not in p] + [
    (p, st) for p in CPU_GPU for st in STAGINGS
]


@pytest.mark.parametrize(
    "pair,staging", FAILURE_CASES, ids=lambda v: "->".join(v) if isinstance(v, tuple) else str(v)
)
def test_failed_copy_changes_nothing(pair, staging, monkeypatch):
    a, b = pair
    g = group_for(pair, **(staged(staging) if staging else {}))
    scattered(g, a, "s", 10 * 16)
    g.allocate("resident", list(range(50, 90)), device=b)
    before, moving = group_state(g), blocks_of(g, "s")
    nth = 1 if staging == "kernel" else 2
    calls = _fail_on_call(monkeypatch, *_write_into_target(pool_copy.route(a, b), staging), nth)
    with pytest.raises(RuntimeError, match="injected"):
        g.move("s", b)
    assert len(calls) == nth
    monkeypatch.undo()
    assert_same_state(before, group_state(g))
    g.check_integrity()
    r = g.move("s", b)  # and once the copy works, the move goes through
    assert r.staging == staging and torch.equal(blocks_of(g, "s"), moving)
    g.check_integrity()
    g.close()


@pytest.mark.parametrize("pair", CPU_GPU, ids="->".join)
def test_host_gather_failing_mid_copy_changes_nothing(pair, monkeypatch):
    a, b = pair
    g = group_for(pair, **staged("host"))
    scattered(g, a, "s", 10 * 16)
    before = group_state(g)
    side = "gather" if a == "cpu" else "scatter"  # the host half of the copy
    calls = _fail_on_call(monkeypatch, HostThreads, side)
    with pytest.raises(RuntimeError, match="injected"):
        g.move("s", b)
    assert len(calls) == 2
    monkeypatch.undo()
    assert_same_state(before, group_state(g))
    g.close()


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


# -- cpu <-> cuda: the two stagings, chunk boundaries, page locks, threads ---------------


@pytest.mark.parametrize("n_blocks", [1, 3, 4, 8, 21])  # 1, 1, 2, 3 and 7 chunks of 3
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("pair", CPU_GPU, ids="->".join)
def test_host_staging_is_bit_exact_across_chunk_boundaries(pair, threads, n_blocks):
    a, b = pair
    g = group_for(pair, **staged("host", threads))
    scattered(g, a, "s", (n_blocks - 1) * 16 + 7)
    before = blocks_of(g, "s")
    r = g.move("s", b)
    assert (r.route, r.staging, r.blocks_copied) == (pool_copy.route(a, b), "host", n_blocks)
    assert torch.equal(blocks_of(g, "s"), before)
    g.check_integrity()
    g.close()


@pytest.mark.parametrize("staging", ["kernel", "direct"])
@pytest.mark.parametrize("layout_order", ["scattered", "consecutive"])
@pytest.mark.parametrize("pair", CPU_GPU, ids="->".join)
def test_locked_stagings_are_bit_exact_for_runs_and_single_blocks(pair, layout_order, staging):
    a, b = pair
    g = group_for(pair, **staged(staging))
    if layout_order == "scattered":
        scattered(g, a, "s", 20 * 16 + 5)
    else:  # fresh pools hand out consecutive blocks: one run, one pitched copy
        g.allocate("s", list(range(3, 3 + 21 * 16 - 11)), device=a)
        g.cache_of("s").pool.kv.view(torch.uint8).random_()
    before = blocks_of(g, "s")
    r = g.move("s", b)
    assert (r.route, r.staging, r.blocks_copied) == (pool_copy.route(a, b), staging, 21)
    assert torch.equal(blocks_of(g, "s"), before)
    back = g.move("s", a)
    assert back.staging == staging and torch.equal(blocks_of(g, "s"), before)
    g.check_integrity()
    g.close()


@pytest.mark.parametrize("pair", CPU_GPU, ids="->".join)
def test_auto_staging_page_locks_the_cpu_pool_until_close(pair):
    a, b = pair
    g = group_for(pair)  # pin_host=None, staging="auto"
    cpu = g.member("cpu").pool
    assert cudart.runtime() is not None, "libcudart could not be bound: direct copies are off"
    assert cudart.is_page_locked(cpu.kv) and g.device_stats()["cpu"].page_locked
    assert not g.device_stats()[next(n for n in pair if n != "cpu")].page_locked
    scattered(g, a, "s", 6 * 16)
    before = blocks_of(g, "s")
    assert g.move("s", b).staging == "kernel"
    g.close()
    assert not cudart.is_page_locked(cpu.kv) and not g.device_stats()["cpu"].page_locked
    assert g.move("s", a).staging == "host"  # still works after close: staged by host threads
    assert torch.equal(blocks_of(g, "s"), before)
    threads = g._transport.threads
    assert threads.running
    g.close()
    assert not threads.running and not threads.workers()


def test_page_lock_of_memory_pinned_already_owns_nothing():
    rt = cudart.runtime()
    pinned = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    lock = cudart.PageLock(pinned, rt)
    assert not lock.owned and not lock.locked
    lock.release()
    assert pinned.is_pinned()
    pageable = cudart.own_pages((3 << 20,), torch.uint8)[1:]  # not page-aligned
    lock = cudart.PageLock(pageable, rt)
    assert lock.owned and lock.locked and cudart.is_page_locked(pageable)
    lock.release()
    lock.release()
    assert not lock.locked and not cudart.is_page_locked(pageable)
    with pytest.raises(ValueError, match="contiguous CPU"):
        cudart.PageLock(torch.zeros(4, 4)[:, 0], rt)


def test_direct_staging_is_refused_before_anything_changes(monkeypatch):
    caches = group_for(["cpu", "cuda:0"], pin_host=False).members()
    with pytest.raises(ValueError, match="pin_host=False"):
        KVCacheGroup(caches, staging="direct", pin_host=False)
    g = KVCacheGroup(caches, chunk_bytes=CHUNK, pin_host=False)  # pageable: auto -> host
    scattered(g, "cpu", "s", 4 * 16)
    assert g.move("s", "cuda:0").staging == "host"
    cpu, gpu = g.member("cpu").pool, g.member("cuda:0").pool
    target = cpu.read_blocks([1]).clone()
    with pytest.raises(ValueError, match="not page-locked"):
        pool_copy.copy_blocks_between(gpu, [0], cpu, [1], staging="direct")
    locked = KVCacheGroup(caches, chunk_bytes=CHUNK)  # locks the pool
    monkeypatch.setattr(cudart.CudaRuntime, "max_pitch", lambda self, device: 1024)
    assert "pitched copy" in host_device.direct_refusal(cpu, gpu)
    with pytest.raises(ValueError, match="pitched copy"):
        pool_copy.copy_blocks_between(gpu, [0], cpu, [1], staging="direct")
    with pytest.raises(ValueError, match="pitched copy"):
        KVCacheGroup(caches, staging="direct")  # the pool is locked by `locked`, not by it
    assert cudart.is_page_locked(cpu.kv)
    assert torch.equal(cpu.read_blocks([1]), target)
    # the pitch limits only the copy engine: auto still takes the kernel
    assert locked.move("s", "cpu").staging == "kernel"
    monkeypatch.undo()
    assert locked.move("s", "cuda:0").staging == "kernel"
    monkeypatch.setattr(cudart.CudaRuntime, "device_pointer", lambda self, ptr: None)
    assert "no device mapping" in host_device.kernel_refusal(cpu, gpu)
    with pytest.raises(ValueError, match="no device mapping"):
        pool_copy.copy_blocks_between(gpu, [0], cpu, [1], staging="kernel")
    assert torch.equal(cpu.read_blocks([1]), target)
    assert locked.move("s", "cpu").staging == "direct"  # auto: the copy engine then
    monkeypatch.setattr(cudart.CudaRuntime, "max_pitch", lambda self, device: 1024)
    assert locked.move("s", "cuda:0").staging == "host"  # neither: host threads
    locked.close()
    g.close()
    assert not cudart.is_page_locked(cpu.kv)


def test_host_threads_are_joined_on_close():
    g = group_for(["cpu", "cuda:0"], **staged("host", threads=4))
    scattered(g, "cpu", "s", 9 * 16)
    g.move("s", "cuda:0")
    g.move("s", "cpu")
    threads = g._transport.threads
    assert 1 <= len(threads.workers()) <= 3
    assert all(t.name.startswith(THREAD_NAME) for t in threads.workers())
    g.close()
    assert not threads.running and not threads.workers()


def test_copy_blocks_between_starts_and_joins_its_own_threads():
    g = group_for(["cpu", "cuda:0"], pin_host=False)
    cpu, gpu = g.member("cpu").pool, g.member("cuda:0").pool
    cpu.kv.view(torch.uint8).random_()
    before = {t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME)}
    done = pool_copy.copy_blocks_between(cpu, [5, 2, 9], gpu, [0, 7, 3], chunk_bytes=CHUNK)
    assert (done.route, done.staging) == ("h2d", "host")
    assert torch.equal(gpu.read_blocks([0, 7, 3]), cpu.read_blocks([5, 2, 9]))
    after = {t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME)}
    assert after <= before  # the threads it started for the call are joined
    g.close()
