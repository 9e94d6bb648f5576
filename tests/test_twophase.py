"""TwoPhaseMove between two CPU KVCaches (distinct pools): full blocks copied in the
background while the source keeps appending, then the stop-and-copy; bit-exact, the
target's blocks hidden from its prefix index until the switch, atomic on every failure."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from _groupcases import member_state, write_kv
from pagedkv import KVCache, KVLayout
from pagedkv.errors import OutOfBlocks
from pagedkv.group.twophase import CopyLane, TwoPhaseMove
from pagedkv.storage import pool_copy

LAYOUT = KVLayout(2, 2, 8, 4, torch.float32)


def caches(n_src: int = 32, n_dst: int = 32, **kw) -> tuple[KVCache, KVCache]:
    return KVCache(LAYOUT, n_src, **kw), KVCache(LAYOUT, n_dst, **kw)


def put(cache: KVCache, seq, tokens, salt=None) -> None:
    cache.allocate(seq, tokens, salt)
    write_kv(cache, seq, 0)


def grow(cache: KVCache, seq, tokens) -> None:
    n = cache.num_tokens(seq)
    cache.append(seq, tokens)
    write_kv(cache, seq, n)


def kv_of(cache: KVCache, seq) -> torch.Tensor:
    return cache.read_blocks(cache.block_table(seq)).clone()


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as ex:
        yield ex


def test_background_copy_then_stop_and_copy_is_bit_exact(executor):
    src, dst = caches()
    put(src, "s", list(range(10)), salt="t")
    move = TwoPhaseMove.begin(src, "s", dst, "d", executor=executor)
    # the source keeps writing while its full blocks travel: the partial one and new ones
    for k in range(7):
        grow(src, "s", [50 + k])
    move.wait()
    assert move.state == "copied" and move.ready()
    want = kv_of(src, "s")
    res = move.finish()
    assert (res.blocks_phase1, res.blocks_phase2, res.blocks_reused) == (2, 3, 0)
    assert res.num_tokens == 17 and res.bytes_copied == 5 * LAYOUT.bytes_per_block
    assert res.route == "host" and 0 <= res.pause_seconds <= res.seconds
    assert torch.equal(kv_of(dst, "d"), want)
    assert dst.token_ids("d") == list(range(10)) + [50 + k for k in range(7)]
    assert dst.salt("d") == "t" and "s" not in src and move.state == "finished"
    for c in (src, dst):
        c.check_integrity()
    # the target's full blocks are findable now, and only in the salt's namespace
    assert dst.lookup(dst.token_ids("d") + [0], "t") == 16
    assert dst.lookup(dst.token_ids("d") + [0]) == 0


def test_target_blocks_stay_hidden_until_the_switch(executor):
    src, dst = caches()
    tokens = list(range(100, 113))
    put(src, "s", tokens)
    gate = threading.Event()
    started = threading.Event()
    executor.submit(lambda: (started.set(), gate.wait(5)))  # hold the copy thread
    started.wait(5)
    move = TwoPhaseMove.begin(src, "s", dst, "d", executor=executor)
    assert move.state == "copying" and not move.ready()
    # another prompt with the same prefix on the target computes it: nothing to find
    assert dst.lookup(tokens + [1]) == 0
    put(dst, "other", tokens + [1])
    assert dst.manager.stats().hit_tokens == 0
    dst.free("other")  # its own blocks are now the cached ones for this prefix
    gate.set()
    move.finish()
    assert torch.equal(kv_of(dst, "d"), kv_of_fresh(tokens))
    dst.check_integrity()
    assert dst.lookup(tokens + [1]) == 12


def kv_of_fresh(tokens) -> torch.Tensor:
    c = KVCache(LAYOUT, 8)
    put(c, "x", tokens)
    return kv_of(c, "x")


def test_prefix_blocks_the_target_caches_are_reused():
    src, dst = caches()
    system = list(range(200, 212))  # three full blocks
    put(dst, "old", system + [1])
    dst.free("old")
    put(src, "s", system + list(range(5)))
    move = TwoPhaseMove.begin(src, "s", dst, "d")  # no executor: phase 1 here
    assert move.state == "copied" and move.blocks_reused == 3
    res = move.finish()
    assert (res.blocks_reused, res.blocks_phase1, res.blocks_phase2) == (3, 1, 1)
    assert torch.equal(kv_of(dst, "d"), kv_of_fresh(system + list(range(5))))
    dst.check_integrity()


def test_abort_and_failures_leave_both_caches_as_they_were(executor, monkeypatch):
    src, dst = caches(32, 8)
    put(src, "s", list(range(9)))
    put(dst, "live", [7] * 5)
    before_src, before_dst = member_state(src), member_state(dst)

    def same():
        assert_same(member_state(src), before_src)
        assert_same(member_state(dst), before_dst)
        src.check_integrity()
        dst.check_integrity()

    move = TwoPhaseMove.begin(src, "s", dst, "d", executor=executor)
    move.abort()
    move.abort()  # idempotent
    assert move.state == "aborted"
    same()
    with pytest.raises(RuntimeError, match="aborted"):
        move.finish()
    # out of blocks at the stop-and-copy: the source grew past the target's room
    move = TwoPhaseMove.begin(src, "s", dst, "d", executor=executor)
    src.append("s", list(range(20)))
    with pytest.raises(OutOfBlocks):
        move.finish()
    assert move.state == "aborted" and dst.seq_ids() == ["live"]
    src.free("s")
    put(src, "s", list(range(9)))
    before_src = member_state(src)
    # a copy that fails in the background thread
    real = pool_copy._ROUTES["host"]

    def failing(s, si, d, di, plan):
        real(s, si[:1], d, di[:1], plan)
        raise RuntimeError("injected copy failure")

    monkeypatch.setitem(pool_copy._ROUTES, "host", failing)
    move = TwoPhaseMove.begin(src, "s", dst, "d", executor=executor)
    with pytest.raises(RuntimeError, match="injected"):
        move.finish()
    same()
    # a source that no longer holds the tokens it had
    monkeypatch.undo()
    move = TwoPhaseMove.begin(src, "s", dst, "d", executor=executor)
    src.free("s")
    put(src, "s", [1] * 12)
    with pytest.raises(ValueError, match="no longer starts with"):
        move.finish()
    assert dst.seq_ids() == ["live"]
    dst.check_integrity()


def assert_same(after: dict, before: dict) -> None:
    assert after.keys() == before.keys()
    for k in before:
        if k == "kv":
            assert torch.equal(after[k], before[k])
        else:
            assert after[k] == before[k], k


def test_bad_arguments_change_nothing():
    src, dst = caches(32, 3)
    put(src, "s", list(range(9)))
    put(dst, "taken", [3])
    state = member_state(dst)
    with pytest.raises(ValueError, match="same caches"):
        TwoPhaseMove.begin(src, "s", src, "d")
    with pytest.raises(ValueError, match="same model, dtype and block size"):
        TwoPhaseMove.begin(src, "s", KVCache(LAYOUT, 8, model_fingerprint="other"))
    with pytest.raises(ValueError, match="same model, dtype and block size"):
        TwoPhaseMove.begin(src, "s", KVCache(KVLayout(2, 2, 8, 8, torch.float32), 8))
    with pytest.raises(KeyError):
        TwoPhaseMove.begin(src, "nope", dst)
    with pytest.raises(ValueError, match="already exists"):
        TwoPhaseMove.begin(src, "s", dst, "taken")
    with pytest.raises(OutOfBlocks):
        TwoPhaseMove.begin(src, "s", dst, "d")  # 3 blocks, 1 held
    with pytest.raises(TypeError, match="begin"):
        TwoPhaseMove()
    with pytest.raises(ValueError, match="chunk_bytes"):
        CopyLane(chunk_bytes=0)
    with pytest.raises(ValueError, match="staging"):
        CopyLane(staging="fast")
    assert_same(member_state(dst), state)
    src.check_integrity()
