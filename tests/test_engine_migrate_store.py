"""Engine.migrate(..., store=) and Engine.resume_migrated: a request parked in a snapshot
store mid-prefill, mid-decode or waiting continues on another engine — in this process
or another one (spawned; a directory store or a real redis-server) — token-identically to
never having moved (batch-invariant mode)."""

from __future__ import annotations

import multiprocessing

import pytest

import _models
from _migrate_worker import resume_all
from pagedkv.engine.request import Status
from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot import SnapshotStore
from test_engine_migrate import GREEDY, SEEDED, engine, params, prompt, reference, serve

# every test on one thread, in batch-invariant mode (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("invariant_one_thread")


@pytest.fixture(scope="module")
def model():
    return _models.tiny(seed=0)


def parked_engine(model, store):
    """Engine A with three requests parked in ``store`` (mid-decode greedy, mid-prefill
    seeded, waiting seeded) while another keeps running; their prompts and params."""
    cases = {
        "decode": (prompt(19, 50), params(GREEDY, 14)),
        "prefill": (prompt(27, 51), params(SEEDED, 10)),
        "waiting": (prompt(11, 52), params(SEEDED, 8)),
    }
    a = engine(model, max_batch_tokens=12, max_num_seqs=3)
    other = a.add_request(prompt(9, 53), params(GREEDY, 20))
    ids = {k: a.add_request(p, sp) for k, (p, sp) in cases.items()}
    for _ in range(3):
        a.step()
    req = {k: a.core.requests[i] for k, i in ids.items()}
    assert len(req["decode"].output) >= 1
    assert 0 < req["prefill"].num_computed < 27 and req["waiting"].status is Status.WAITING
    results = {k: a.migrate(ids[k], store=store, name=f"req-{k}") for k in cases}
    return a, other, cases, results


def test_parked_requests_continue_on_another_engine(model, tmp_path):
    a, other, cases, results = parked_engine(model, tmp_path)
    assert results["decode"].kv_moved and results["decode"].route == "store"
    assert not results["waiting"].kv_moved and results["waiting"].snapshot == "req-waiting"
    assert results["decode"].target_request_id is None and results["decode"].bytes_copied > 0
    assert len(serve(a)[0][other]) == 20  # A keeps serving the rest
    assert a.stats().blocks_in_use == 0
    b = engine(model, snapshot_store=tmp_path)
    mine = b.add_request(prompt(30, 54), params(SEEDED, 6))
    ids = {b.resume_migrated(f"req-{k}"): k for k in cases}
    outs = serve(b)[0]
    for rid, k in ids.items():
        assert outs[rid] == reference(model, *cases[k]), k
    assert outs[mine] == reference(model, prompt(30, 54), params(SEEDED, 6))
    assert SnapshotStore(tmp_path).names() == []  # resumed snapshots are deleted
    b.cache.check_integrity()
    assert b.stats().blocks_in_use == 0


def test_an_overlapping_engine_parks_the_token_still_on_the_device(model, tmp_path):
    """With overlap a step is in flight between step() calls: parking takes its results
    first (once the snapshot lacked the pending token and resume refused it)."""
    p, sp = prompt(29, 55), params(SEEDED, 16)
    a = engine(model, overlap=True)
    rid = a.add_request(p, sp)
    for _ in range(6):
        a.step()
    assert a.core.requests[rid].pending == 1
    res = a.migrate(rid, store=tmp_path, name="parked")
    assert res.kv_moved and a.stats().blocks_in_use == 0
    b = engine(model, overlap=True, snapshot_store=tmp_path)
    new = b.resume_migrated("parked")
    assert serve(b)[0][new] == reference(model, p, sp)
    b.cache.check_integrity()
    assert b.stats().blocks_in_use == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["directory", pytest.param("redis", marks=pytest.mark.redis)]
)  # fmt: skip
def test_migration_across_two_processes(model, tmp_path, kind, request):
    store = str(tmp_path) if kind == "directory" else request.getfixturevalue("redis_url")
    a, _, cases, _ = parked_engine(model, store)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    other = prompt(30, 54)
    child = ctx.Process(target=resume_all, args=(store, [f"req-{k}" for k in cases], other,
                                                 out))  # fmt: skip
    child.start()
    status, got, blocks = out.get(timeout=240)
    child.join(60)
    assert status == "ok", got
    assert blocks == 0 and child.exitcode == 0
    for k, (p, sp) in cases.items():
        assert got[f"req-{k}"] == reference(model, p, sp), k
    assert got["mine"] == reference(model, other, params(GREEDY, 6))
    with SnapshotStore(store) as left:
        assert left.names() == []  # the other process deleted what it resumed


def test_keep_and_the_errors_of_the_slow_path(model, tmp_path):
    a, b = engine(model, snapshot_store=tmp_path), engine(model, snapshot_store=tmp_path)
    p, sp = prompt(14, 55), params(GREEDY, 9)
    ref = reference(model, p, sp)
    rid = a.add_request(p, sp)
    a.step()
    a.migrate(rid, name="x")
    with pytest.raises(SnapshotError, match="exists"):  # nothing changed on a refusal
        a.migrate(a.add_request(p, sp), name="x")
    assert len(a.core.requests) == 1
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        b.resume_migrated("nope")
    with pytest.raises(SnapshotError, match="same model"):
        engine(_models.tiny("qwen2", seed=0), snapshot_store=tmp_path).resume_migrated("x")
    small = engine(model, num_blocks=2, snapshot_store=tmp_path)
    with pytest.raises(OutOfBlocks, match="no room to resume"):
        small.resume_migrated("x")
    assert small.stats().blocks_in_use == 0 and not small.has_unfinished()
    first = b.resume_migrated("x", keep=True)
    second = b.resume_migrated("x")  # kept: the same request can start twice
    outs = serve(b)[0]
    assert outs[first] == outs[second] == ref
    with pytest.raises(SnapshotError, match="no snapshot named 'x'"):
        b.resume_migrated("x")
    done = a.generate([p], sp, retain=True)[0]
    a.snapshot(done, "conversation")  # an Engine.snapshot is not a parked request
    with pytest.raises(SnapshotError, match="not saved by Engine.migrate"):
        b.resume_migrated("conversation")
