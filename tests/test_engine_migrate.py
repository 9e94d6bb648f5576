"""Engine.migrate between two engines on CPU (distinct pools): a request moved mid-prefill
or mid-decode, in the background or at once, with other requests running on both sides,
finishes token-identically to never having moved (batch-invariant mode, greedy and
seeded); every failure leaves the source serving it unchanged."""

from __future__ import annotations

import pytest
import torch

import _models
from pagedkv.engine import Engine, Migrator, SamplingParams
from pagedkv.engine.request import Status
from pagedkv.errors import EngineClosedError, MigrationError, OutOfBlocks

BS = 4
GREEDY = dict(ignore_eos=True)
SEEDED = dict(ignore_eos=True, temperature=0.9, top_p=0.95, seed=11)


# every test on one thread, in batch-invariant mode (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("invariant_one_thread")


@pytest.fixture(scope="module")
def model():
    return _models.tiny(seed=0)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def params(kind: dict, n: int = 16) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kind)


def engine(model, **kw) -> Engine:
    return Engine(model, **{"num_blocks": 48, "block_size": BS, **kw})


def serve(*engines: Engine) -> list[dict[int, list[int]]]:
    """Step every engine until none has work; each engine's finished outputs by id."""
    out: list[dict[int, list[int]]] = [{} for _ in engines]
    while any(e.has_unfinished() for e in engines):
        for i, e in enumerate(engines):
            for o in e.step():
                out[i][o.request_id] = o.token_ids
    return out


def reference(model, p: list[int], sp: SamplingParams, **kw) -> list[int]:
    return engine(model, **kw).generate([p], sp)[0].token_ids


def kv_tokens(e: Engine, request_id: int) -> torch.Tensor:
    """The K and V of every token of retained request ``request_id`` (its blocks' written
    slots only), every layer: ``[layers, 2, tokens, heads, head_dim]``."""
    seq = e.core.retained[request_id].seq_id
    n, table, pool = e.cache.num_tokens(seq), e.cache.block_table(seq), e.cache.pool
    rows = [
        torch.stack([pool.k(layer)[table], pool.v(layer)[table]]).flatten(1, 2)[:, :n]
        for layer in range(e.cache.layout.num_layers)
    ]
    return torch.stack(rows)


def check_clean(*engines: Engine) -> None:
    for e in engines:
        e.cache.check_integrity()
        assert e.stats().blocks_in_use == 0


@pytest.mark.parametrize("background", [True, False], ids=["background", "at-once"])
@pytest.mark.parametrize("kind", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("when", ["mid-prefill", "mid-decode"])
def test_migrated_request_is_token_identical_with_others_on_both_sides(
    model, kind, when, background
):
    p, sp = prompt(23), params(kind)
    others_a, others_b = [prompt(9, 1), prompt(14, 2)], [prompt(30, 3)]
    ref = reference(model, p, sp)
    # its KV, bit for bit, as an unmigrated run with the same prefill chunks computes it
    # (attention without the chunk-invariant kernels of EngineConfig.batch_invariant gives
    # a first chunk of 8 tokens other last bits from layer 1 on than one of 23: the tokens
    # are the same, the KV not)
    alone = engine(model, max_batch_tokens=8)
    ref_kv = kv_tokens(alone, alone.generate([p], sp, retain=True)[0].request_id)
    ref_others = [reference(model, q, params(SEEDED, 12)) for q in others_a + others_b]
    # chunked prefill (8 tokens a step) so that "mid-prefill" is a state that exists
    a, b = engine(model, max_batch_tokens=8), engine(model)
    rid = a.add_request(p, sp, retain=True)
    ids_a = [a.add_request(q, params(SEEDED, 12)) for q in others_a]
    ids_b = [b.add_request(q, params(SEEDED, 12)) for q in others_b]
    steps = 1 if when == "mid-prefill" else 6
    for _ in range(steps):
        a.step()
        b.step()
    req = a.core.requests[rid]
    if when == "mid-prefill":
        assert req.status is Status.RUNNING and 0 < req.num_computed < len(p)
    else:
        assert len(req.output) >= 2
    if background:
        m = a.migrate(rid, b, background=True)
        for _ in range(2):  # A keeps decoding it while its full blocks are copied
            a.step()
            b.step()
        m_out = len(a.core.requests[rid].output)
        res = m.finish()
        assert res.blocks_background > 0 and m.state == "finished"
        assert len(b.core.requests[res.target_request_id].output) == m_out
    else:
        res = a.migrate(rid, b)
        assert res.blocks_background == 0 and res.blocks_final > 0
    assert res.kv_moved and res.request_id == rid and res.route == "host"
    assert res.bytes_copied == (res.blocks_background + res.blocks_final) * (
        a.cache.layout.bytes_per_block
    )
    assert 0 <= res.pause_seconds <= res.seconds
    assert rid not in a.core.requests
    outs_a, outs_b = serve(a, b)
    assert outs_b[res.target_request_id] == ref
    assert torch.equal(kv_tokens(b, res.target_request_id), ref_kv)
    b.release(res.target_request_id)
    got = [outs_a[i] for i in ids_a] + [outs_b[i] for i in ids_b]
    assert got == ref_others
    check_clean(a, b)


@pytest.mark.parametrize("background", [True, False], ids=["background", "at-once"])
def test_overlapping_engines_migrate_with_a_step_in_flight(model, background):
    """With overlap (the CUDA default) a step is in flight between step() calls and the
    request's last sampled token is still on the device: the migration takes that step's
    results first, so the target neither misses the token nor looks for it on its own
    device (once a KeyError in the target's step)."""
    p, sp = prompt(23), params(SEEDED)
    ref, other_ref = reference(model, p, sp), reference(model, prompt(30, 3), params(GREEDY, 12))
    a, b = engine(model, overlap=True), engine(model, overlap=True)
    rid = a.add_request(p, sp)
    other = b.add_request(prompt(30, 3), params(GREEDY, 12))
    for _ in range(5):
        a.step()
        b.step()
    assert a.core.requests[rid].pending == 1 and a.core._inflight is not None
    if background:
        m = a.migrate(rid, b, background=True)
        a.step()
        b.step()
        res = m.finish()
    else:
        res = a.migrate(rid, b)
    new = b.core.requests[res.target_request_id]
    assert new.pending == 0 and new.num_tokens == new.num_computed + 1
    outs_a, outs_b = serve(a, b)
    assert outs_b[res.target_request_id] == ref and outs_b[other] == other_ref
    check_clean(a, b)


def test_the_target_reuses_its_cached_prefix_and_hides_blocks_until_the_switch(model):
    shared = prompt(16, 4)  # four full blocks both engines will know
    p, sp = shared + prompt(7, 5), params(GREEDY, 10)
    ref = reference(model, p, sp)
    a, b = engine(model), engine(model)
    b.generate([shared + prompt(5, 6)], params(GREEDY, 2))  # B caches the shared blocks
    rid = a.add_request(p, sp)
    for _ in range(3):
        a.step()
    m = a.migrate(rid, b, background=True)
    tokens = a.cache.token_ids(rid)
    # B finds the shared prefix it had, not the migrating sequence's own blocks
    assert b.cache.lookup(tokens + [1]) == 16
    res = m.finish()
    assert res.blocks_reused == 4
    assert b.cache.lookup(tokens + [1]) == len(tokens) // BS * BS  # findable after the switch
    assert serve(a, b)[1][res.target_request_id] == ref
    check_clean(a, b)


def test_a_waiting_request_moves_without_kv(model):
    p, sp = prompt(13, 7), params(SEEDED, 9)
    ref = reference(model, p, sp)
    a, b = engine(model, max_num_seqs=1), engine(model)
    first = a.add_request(prompt(5, 8), params(GREEDY, 3))
    rid = a.add_request(p, sp, priority=-2, cache_salt="tenant")
    a.step()  # the first one runs; ours waits (max_num_seqs=1)
    assert a.core.requests[rid].status is Status.WAITING
    res = a.migrate(rid, b)
    assert not res.kv_moved and res.route is None and res.bytes_copied == 0
    moved = b.core.requests[res.target_request_id]
    assert (moved.priority, moved.cache_salt, moved.status) == (-2, "tenant", Status.WAITING)
    outs_a, outs_b = serve(a, b)
    assert outs_b[res.target_request_id] == ref and first in outs_a
    check_clean(a, b)


def test_a_request_preempted_during_the_copy_is_copied_again(model):
    p, sp = prompt(10, 9), params(GREEDY, 24)
    ref = reference(model, p, sp)
    # 12 blocks for two requests that grow to 9 and 8 blocks: "oldest" preempts ours
    a = engine(model, num_blocks=12, preemption_policy="oldest")
    b = engine(model)
    rid = a.add_request(p, sp)
    a.add_request(prompt(10, 10), params(GREEDY, 22))
    for _ in range(2):
        a.step()
    m = a.migrate(rid, b, background=True)
    req = a.core.requests[rid]
    for _ in range(40):  # until A has preempted it and admitted it again
        a.step()
        if req.num_preemptions and req.status is Status.RUNNING:
            break
    assert req.num_preemptions and req.status is Status.RUNNING and not req.finish_reason
    res = m.finish()
    assert res.kv_moved and res.blocks_background == 0  # the background copy was dropped
    assert serve(a, b)[1][res.target_request_id] == ref
    check_clean(a, b)


def test_a_full_target_keeps_the_request_waiting_with_its_kv(model):
    p, sp = prompt(18, 12), params(SEEDED, 10)
    ref = reference(model, p, sp)
    a, b = engine(model), engine(model, max_num_seqs=1)
    busy = b.add_request(prompt(7, 13), params(GREEDY, 6))
    b.step()
    rid = a.add_request(p, sp)
    for _ in range(3):
        a.step()
    res = a.migrate(rid, b)
    moved = b.core.requests[res.target_request_id]
    # b runs one request at a time: ours waits, its KV resident (nothing to recompute)
    assert moved.status is Status.WAITING and moved.num_computed == res.num_tokens > 0
    assert b.cache.num_tokens(moved.seq_id) == res.num_tokens
    prefill_before = b.stats().prefill_tokens
    outs = serve(a, b)[1]
    assert outs[res.target_request_id] == ref and len(outs[busy]) == 6
    assert b.stats().prefill_tokens == prefill_before  # its prompt was not computed again
    check_clean(a, b)


def test_a_request_aborted_on_the_source_during_the_copy_is_not_migrated(model):
    a, b = engine(model), engine(model)
    rid = a.add_request(prompt(17, 14), params(GREEDY, 8))
    a.step()
    m = a.migrate(rid, b, background=True)
    a.abort(rid)
    with pytest.raises(MigrationError, match="was aborted"):
        m.finish()
    assert m.state == "aborted" and not a.has_unfinished() and not b.has_unfinished()
    check_clean(a, b)


def test_many_requests_move_over_one_migrator(model):
    ps = [prompt(11 + i, 20 + i) for i in range(4)]
    sp = params(SEEDED, 12)
    refs = [reference(model, p, sp) for p in ps]
    a, b = engine(model), engine(model)
    ids = [a.add_request(p, sp) for p in ps]
    for _ in range(4):
        a.step()
    with Migrator(a, b) as link:
        moves = [link.start(r) for r in ids]
        a.step()
        b.step()
        results = [m.finish() for m in moves]
    outs = serve(a, b)[1]
    assert [outs[r.target_request_id] for r in results] == refs
    check_clean(a, b)


def test_retained_request_state_goes_along(model, tmp_path):
    p, sp = prompt(12, 30), params(GREEDY, 8)
    a, b = engine(model), engine(model, snapshot_store=tmp_path)
    rid = a.add_request(p, sp, retain=True)
    a.step()
    res = a.migrate(rid, b)
    out = serve(a, b)[1][res.target_request_id]
    assert b.stats().retained_seqs == 1
    info = b.snapshot(res.target_request_id, "kept")
    assert info.num_tokens == len(p) + len(out) - 1


def test_a_stream_on_the_source_ends_when_its_request_moves(model):
    a, b = engine(model), engine(model)
    it = a.stream(prompt(9, 31), params(GREEDY, 10))
    first = next(it)
    res = a.migrate(first.request_id, b)
    rest = list(it)
    assert rest[-1].finish_reason == "migrated"
    assert len(serve(a, b)[1][res.target_request_id]) == 10


# ------------------------------------------------------------------ atomicity, errors
def test_no_room_on_the_target_changes_nothing(model):
    p, sp = prompt(21, 40), params(GREEDY, 12)
    ref = reference(model, p, sp)
    a, b = engine(model), engine(model, num_blocks=3)
    rid = a.add_request(p, sp)
    a.step()
    with pytest.raises(OutOfBlocks):
        a.migrate(rid, b)
    assert b.stats().blocks_in_use == 0 and a.core.requests[rid].status is Status.RUNNING
    assert serve(a, b)[0][rid] == ref
    check_clean(a, b)


def test_a_failure_at_the_switch_leaves_the_source_serving(model):
    p, sp = prompt(15, 41), params(GREEDY, 14)
    ref = reference(model, p, sp)
    a, b = engine(model), engine(model, num_blocks=8)
    rid = a.add_request(p, sp)
    a.step()
    m = a.migrate(rid, b, background=True)
    before = b.cache.num_free_blocks
    b.generate([prompt(4 * before - 1, 42)], params(GREEDY, 1), retain=True)  # fills B
    for _ in range(6):  # the request now needs blocks B no longer has
        a.step()
    with pytest.raises(OutOfBlocks):
        m.finish()
    assert m.state == "aborted" and a.core.requests[rid].status is Status.RUNNING
    assert b.stats().blocks_in_use == b.cache.num_blocks - before  # only the retained one
    assert serve(a, b)[0][rid] == ref
    a.cache.check_integrity()
    b.cache.check_integrity()


def test_a_request_that_finished_first_is_not_migrated(model):
    a, b = engine(model), engine(model)
    rid = a.add_request(prompt(9, 43), params(GREEDY, 3))
    a.step()
    m = a.migrate(rid, b, background=True)
    out = serve(a)[0][rid]
    with pytest.raises(MigrationError, match="finished"):
        m.finish()
    assert len(out) == 3 and m.state == "aborted"
    check_clean(a, b)
    m.abort()  # idempotent
    with pytest.raises(RuntimeError, match="aborted"):
        m.finish()


def test_bad_targets_and_requests_are_refused(model, tmp_path):
    a, b = engine(model), engine(model)
    rid = a.add_request(prompt(9, 44), params(GREEDY, 4))
    with pytest.raises(KeyError, match="unknown request"):
        a.migrate(999, b)
    with pytest.raises(ValueError, match="same engine"):
        a.migrate(rid, a)
    with pytest.raises(TypeError, match="between Engines"):
        a.migrate(rid, object())
    with pytest.raises(ValueError, match="same model, dtype and block size"):
        a.migrate(rid, engine(_models.tiny("qwen2", seed=0)))
    with pytest.raises(ValueError, match="same model, dtype and block size"):
        a.migrate(rid, engine(model, block_size=8))
    with pytest.raises(ValueError, match="not both"):
        a.migrate(rid, b, store=tmp_path)
    with pytest.raises(ValueError, match="background=True moves to an engine"):
        a.migrate(rid, store=tmp_path, background=True)
    with pytest.raises(TypeError, match="background"):
        a.migrate(rid, b, background=1)
    closed = engine(model)
    closed.close()
    with pytest.raises(EngineClosedError):
        a.migrate(rid, closed)
    done = a.generate([prompt(5, 45)], params(GREEDY, 2), retain=True)[0]
    with pytest.raises(ValueError, match="finished"):
        a.migrate(done.request_id, b)
    assert rid in a.core.requests and b.stats().blocks_in_use == 0
    assert len(serve(a, b)[0][rid]) == 4
