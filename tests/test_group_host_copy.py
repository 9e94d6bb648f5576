"""The CPU side of CPU<->CUDA moves, on the CPU: HostThreads gathers and scatters blocks of a
CPU pool bit-exactly (any thread count, odd chunk sizes, shares that split a block), waits
for every share before it returns or raises, and joins its threads on close; the copy
options of a group and of copy_blocks_between are checked before anything moves."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedkv import KVCache, KVCacheGroup, KVLayout
from pagedkv.storage import KVPool, cudart, host_device, host_threads, pool_copy
from pagedkv.storage.host_threads import HostThreads, default_threads

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)  # 6 planes/block


def random_pool(num_blocks: int = 16, seed: int = 0, layout: KVLayout = LAYOUT) -> KVPool:
    pool = KVPool(layout, num_blocks)
    g = torch.Generator().manual_seed(seed)
    pool.kv.view(torch.uint8).copy_(
        torch.randint(0, 256, pool.kv.view(torch.uint8).shape, dtype=torch.uint8, generator=g)
    )
    return pool


def rows(n: int, layout: KVLayout = LAYOUT) -> torch.Tensor:
    return torch.full((n, layout.bytes_per_block), 0xAB, dtype=torch.uint8)


@pytest.mark.parametrize("threads", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("ids", [[7], [3, 0], [5, 1, 14, 2, 9, 11, 0], list(range(15, 2, -1))])
def test_gather_is_read_blocks_bit_exact(threads, ids):
    pool = random_pool()
    with HostThreads(threads) as h:
        out = h.gather(pool, ids, rows(len(ids)))
    assert torch.equal(out, pool.read_blocks(ids))


@pytest.mark.parametrize("threads", [1, 2, 4, 7])
@pytest.mark.parametrize("ids", [[7], [5, 1, 14, 2, 9, 11, 0], [12, 3, 8, 4, 13]])
def test_scatter_is_write_blocks_bit_exact_and_touches_nothing_else(threads, ids):
    data = random_pool(seed=1).read_blocks(list(range(len(ids))))
    pool, want = random_pool(seed=2), random_pool(seed=2)
    with HostThreads(threads) as h:
        h.scatter(pool, ids, data)
    want.write_blocks(ids, data)
    assert torch.equal(pool.kv.view(torch.uint8), want.kv.view(torch.uint8))  # NaNs are bytes too


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(st.integers(0, 11), min_size=1, max_size=12, unique=True),
    threads=st.integers(1, 9),
    layers=st.integers(1, 4),
)
def test_gather_then_scatter_round_trips(ids, threads, layers):
    layout = KVLayout(num_layers=layers, num_kv_heads=1, head_dim=4, block_size=2)
    src, dst = random_pool(12, seed=3, layout=layout), KVPool(layout, 12)
    with HostThreads(threads) as h:
        staged = h.gather(src, ids, rows(len(ids), layout))
        h.scatter(dst, ids, staged)
    assert torch.equal(dst.read_blocks(ids), src.read_blocks(ids))
    others = sorted(set(range(12)) - set(ids))
    assert not dst.read_blocks(others).any()


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_pool_to_pool_copy_is_bit_exact(threads):
    src, dst, want = random_pool(seed=4), random_pool(seed=5), random_pool(seed=5)
    s, d = [3, 9, 0, 15, 4], [7, 1, 12, 2, 8]
    with HostThreads(threads) as h:
        h.copy(src, s, dst, d)
    want.write_blocks(d, src.read_blocks(s))
    assert torch.equal(dst.kv.view(torch.uint8), want.kv.view(torch.uint8))
    with pytest.raises(ValueError, match="distinct"):
        h.copy(src, [0, 1], dst, [2, 2])
    with pytest.raises(ValueError, match="distinct KVPools"):
        h.copy(src, [0], src, [1])
    with pytest.raises(ValueError, match="layouts differ"):
        h.copy(src, [0], KVPool(KVLayout(1, 1, 4, 2), 4), [1])
    assert torch.equal(dst.kv.view(torch.uint8), want.kv.view(torch.uint8))


def test_shares_cover_every_segment_once():
    for total, n in [(1, 1), (6, 4), (7, 3), (42, 5), (5, 5), (64, 64)]:
        shares = host_threads._shares(total, n)
        assert len(shares) == n and shares[0][0] == 0 and shares[-1][1] == total
        assert all(a < b for a, b in shares) and all(
            x[1] == y[0] for x, y in zip(shares, shares[1:])
        )
        sizes = [b - a for a, b in shares]
        assert max(sizes) - min(sizes) <= 1


def test_bad_arguments_raise_and_change_nothing():
    pool = random_pool()
    before = pool.kv.clone()
    h = HostThreads(2)
    bad = [
        (ValueError, "CPU", lambda: h.gather(pool.kv, [0], rows(1))),
        (ValueError, "out of range", lambda: h.gather(pool, [16], rows(1))),
        (ValueError, "out of range", lambda: h.scatter(pool, [-1], rows(1))),
        (ValueError, "shape", lambda: h.gather(pool, [0, 1], rows(1))),
        (ValueError, "uint8", lambda: h.scatter(pool, [0], rows(1).view(torch.int8))),
        (
            ValueError,
            "contiguous",
            lambda: h.gather(pool, [0, 1], rows(LAYOUT.bytes_per_block)[:, :2].t()),
        ),
        (ValueError, "distinct", lambda: h.scatter(pool, [3, 3], rows(2))),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
    assert torch.equal(pool.kv.view(torch.uint8), before.view(torch.uint8)) and not h.running
    for threads, exc in [(0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError)]:
        with pytest.raises(exc, match="threads"):
            HostThreads(threads)
    assert 1 <= default_threads() <= host_threads.MAX_DEFAULT_THREADS


def test_a_failing_share_raises_only_after_every_share_has_finished(monkeypatch):
    pool, finished, real = random_pool(), [], host_threads._copy

    def copy(src, s, dst, d, share):
        if share[0] == 0:  # the caller's share fails at once
            raise RuntimeError("injected share failure")
        time.sleep(0.05)
        real(src, s, dst, d, share)
        finished.append(share)

    monkeypatch.setattr(host_threads, "_copy", copy)
    h = HostThreads(4)
    with pytest.raises(RuntimeError, match="injected"):
        h.gather(pool, [1, 2, 3], rows(3))
    assert len(finished) == 3  # the three workers' shares ran to the end before the raise
    monkeypatch.undo()
    assert torch.equal(h.gather(pool, [1, 2, 3], rows(3)), pool.read_blocks([1, 2, 3]))
    h.close()


def test_a_failing_worker_is_reported(monkeypatch):
    pool, real = random_pool(), host_threads._copy

    def copy(src, s, dst, d, share):
        if share[0] > 0:
            raise OSError("injected worker failure")
        real(src, s, dst, d, share)

    monkeypatch.setattr(host_threads, "_copy", copy)
    with HostThreads(3) as h, pytest.raises(OSError, match="injected worker"):
        h.scatter(pool, [4, 5], rows(2))


def test_close_joins_the_threads_and_a_later_copy_starts_them_again():
    pool = random_pool()
    h = HostThreads(3)
    assert not h.running and not h.workers()
    h.gather(pool, [0, 1, 2], rows(3))
    assert h.running and 1 <= len(h.workers()) <= 2
    assert all(t.name.startswith(host_threads.THREAD_NAME) for t in h.workers())
    h.close()
    h.close()  # idempotent
    assert not h.running and not h.workers()
    assert torch.equal(h.gather(pool, [4, 9], rows(2)), pool.read_blocks([4, 9]))
    with h:
        assert h.running
    assert not h.running and not h.workers()
    with HostThreads(1) as one:  # the caller copies alone: no thread at all
        one.gather(pool, list(range(16)), rows(16))
        assert not one.running and not one.workers()


def test_runs_merge_blocks_consecutive_on_both_sides():
    assert host_device.runs([4, 5, 6, 0, 9, 10, 11], [1, 2, 3, 4, 7, 9, 10]) == [
        (4, 1, 3), (0, 4, 1), (9, 7, 1), (10, 9, 2)
    ]  # fmt: skip
    assert host_device.runs([3], [8]) == [(3, 8, 1)]
    assert host_device.runs([2, 1, 0], [0, 1, 2]) == [(2, 0, 1), (1, 1, 1), (0, 2, 1)]


def test_copy_options_are_checked_before_any_byte_moves():
    a, b = random_pool(8), KVPool(LAYOUT, 8)
    with pytest.raises(ValueError, match="staging"):
        pool_copy.copy_blocks_between(a, [0], b, [1], staging="fast")
    with pytest.raises(TypeError, match="HostThreads"):
        pool_copy.copy_blocks_between(a, [0], b, [1], host=4)
    assert not b.kv.any()
    with HostThreads(2) as h:
        done = pool_copy.copy_blocks_between(a, [2], b, [3], staging="direct", host=h)
    assert (done.route, done.staging) == ("host", None)  # no CPU<->CUDA pair: nothing staged
    assert torch.equal(b.read_blocks([3]), a.read_blocks([2]))
    assert pool_copy.staging_for(a, b, "host") is None
    assert not cudart.is_page_locked(a.kv)


def test_group_copy_options_are_checked():
    caches = [KVCache(LAYOUT, 8), KVCache(LAYOUT, 8)]
    for kwargs, exc, match in [
        ({"staging": "dma"}, ValueError, "staging"),
        ({"host_threads": 0}, ValueError, "threads"),
        ({"host_threads": "4"}, TypeError, "threads"),
        ({"pin_host": 1}, TypeError, "pin_host"),
        ({"pin_host": True}, ValueError, "page-locks CPU members"),
    ]:
        with pytest.raises(exc, match=match):
            KVCacheGroup(caches, **kwargs)
    g = KVCacheGroup.create(LAYOUT, 8, ["cpu", "cpu"], staging="host", host_threads=3)
    assert (g.staging, g.host_threads, g.chunk_bytes) == ("host", 3, pool_copy.CHUNK_BYTES)
    assert not any(s.page_locked for s in g.device_stats().values())
    g.allocate("s", list(range(9)), device="cpu#0")
    r = g.move("s", "cpu#1")
    assert (r.route, r.staging) == ("host", None)
    threads = g._transport.threads
    assert threads.running and threads.threads == 3
    g.close()
    assert not threads.running and not threads.workers()
