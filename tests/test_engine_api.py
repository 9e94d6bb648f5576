"""The engine's request API: argument checks that change nothing, and cache salts that
keep tenants' KV apart on the device, in a tier and through snapshots (tiny models)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from _models import tiny
from pagedkv.engine import Engine, SamplingParams
from pagedkv.errors import SnapshotError
from pagedkv.snapshot import SnapshotStore
from pagedkv.tiers import CPUTier
from test_engine import GREEDY, prompts_of

pytestmark = pytest.mark.usefixtures("single_thread")

BS = 8


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture
def engine(model):
    return Engine(model, num_blocks=32, block_size=BS)


def state(engine: Engine) -> tuple:
    """Everything a failed submission must leave as it was."""
    s = engine.scheduler
    return (
        engine.stats(), dict(engine.core.requests), list(s.waiting), list(s.running),
        engine.cache.num_free_blocks, engine.cache.seq_ids(), engine.cache.stats(),
    )  # fmt: skip


def next_id(engine: Engine) -> int:
    """The id the next request gets (the probe request is dropped again)."""
    rid = engine.add_request([5], SamplingParams(max_new_tokens=1))
    engine.abort(rid)
    return rid


# ------------------------------------------------------------------ SamplingParams
BAD_PARAMS = [
    (dict(seed="x"), TypeError, "seed must be None or an int"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed=-1), ValueError, r"seed must be None or an int in \[0, 2\*\*64\)"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(temperature="hot"), TypeError, "temperature must be a float >= 0"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(temperature=None), TypeError, "temperature"),
    (dict(temperature=-0.1), ValueError, "temperature must be a finite float >= 0"),
    (dict(temperature=math.nan), ValueError, "temperature must be a finite"),
    (dict(temperature=math.inf), ValueError, "temperature must be a finite"),
    (dict(top_k=1.0), TypeError, "top_k must be an int >= 0"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_k=-1), ValueError, "top_k must be an int >= 0"),
    (dict(top_p="0.9"), TypeError, "top_p must be a float in"),
    (dict(top_p=False), TypeError, "top_p"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=math.nan), ValueError, "top_p"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be a token count"),
    (dict(max_new_tokens=4.0), TypeError, "max_new_tokens"),
    (dict(max_new_tokens="4"), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(stop_token_ids=5), TypeError, r"stop_token_ids must be a list .*single int 5"),
    (dict(stop_token_ids="12"), TypeError, "stop_token_ids must be a list"),
    (dict(stop_token_ids=None), TypeError, "stop_token_ids must be a list"),
    (dict(stop_token_ids=[1, 2.0]), TypeError, r"stop_token_ids\[1\] must be an int"),
    (dict(stop_token_ids=[True]), TypeError, r"stop_token_ids\[0\]"),
    (dict(stop_token_ids=[3, -1]), ValueError, r"stop_token_ids\[1\] must be a token id >= 0"),
    (dict(ignore_eos=1), TypeError, "ignore_eos must be True or False"),
    (dict(ignore_eos="yes"), TypeError, "ignore_eos"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_PARAMS, ids=[str(b[0]) for b in BAD_PARAMS])
def test_sampling_params_reject_bad_fields_naming_them(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_accepted_values():
    sp = SamplingParams(
        max_new_tokens=np.int64(3), temperature=1, top_k=np.int32(5), top_p=np.float32(0.5),
        seed=np.uint64(2**63), stop_token_ids=np.array([7, 8]),
    )  # fmt: skip
    assert (sp.max_new_tokens, sp.top_k, sp.seed, sp.stop_token_ids) == (3, 5, 2**63, (7, 8))
    assert type(sp.max_new_tokens) is int and type(sp.seed) is int
    assert type(sp.temperature) is float and sp.top_p == 0.5
    assert all(type(t) is int for t in sp.stop_token_ids)
    assert SamplingParams(stop_token_ids=[4]).stop_token_ids == (4,)
    assert SamplingParams(stop_token_ids=range(2)).stop_token_ids == (0, 1)


# ------------------------------------------------------------------ submissions
def test_bad_params_and_prompts_change_nothing(engine):
    p = prompts_of((9, 12), seed=1)
    rid = next_id(engine)
    before = state(engine)
    cases = [
        (lambda: engine.generate(p, {"max_new_tokens": 2}), TypeError,
         r"params must be SamplingParams \(or a list of them.*got dict; use SamplingParams"),
        (lambda: engine.generate(p, [GREEDY, {"max_new_tokens": 2}]), TypeError,
         r"prompt 1: params must be SamplingParams, got dict; use SamplingParams\(\*\*d\)"),
        (lambda: engine.generate(p, [GREEDY]), ValueError, "1 params values for 2 prompts"),
        (lambda: engine.generate(p, 3), TypeError, "params must be SamplingParams"),
        (lambda: engine.add_request(p[0], {"max_new_tokens": 2}), TypeError,
         r"got dict; use SamplingParams\(\*\*d\)"),
        (lambda: engine.generate([p[0], [1, 2.5]]), TypeError,
         "prompt 1: prompt token 1 must be an int token id, got float"),
        (lambda: engine.generate([p[0], [1, True]]), TypeError, "prompt 1: prompt token 1"),
        (lambda: engine.generate([p[0], 7]), TypeError, "prompt 1: a prompt must be a string"),
        (lambda: engine.add_request(torch.tensor([[1, 2]])), TypeError, "1-D integer"),
        (lambda: engine.add_request(torch.tensor([1.0])), TypeError, "1-D integer"),
        (lambda: engine.generate(p[0]), TypeError, "prompts must be a list of prompts"),
        (lambda: engine.generate({"a": 1}), TypeError, "prompts must be a list of prompts"),
    ]  # fmt: skip
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        assert state(engine) == before
    assert next_id(engine) == rid + 1  # failed submissions took no request id
    # tensors and arrays of integer ids are prompts too
    outs = engine.generate([torch.tensor(p[0]), np.array(p[1])], SamplingParams(max_new_tokens=2))
    assert [o.prompt_token_ids for o in outs] == p


def test_bad_salts_change_nothing(engine):
    p = prompts_of((9, 12), seed=1)
    before = state(engine)
    cases = [
        (lambda: engine.add_request(p[0], GREEDY, cache_salt=7), TypeError,
         "cache_salt must be None, a str or bytes"),
        (lambda: engine.add_request(p[0], GREEDY, cache_salt=bytearray(b"a")), TypeError,
         "cache_salt"),
        (lambda: engine.add_request(p[0], GREEDY, cache_salt=""), ValueError,
         "must not be empty; pass None"),
        (lambda: engine.generate(p, GREEDY, cache_salt=["a"]), ValueError,
         "1 cache_salt values for 2 prompts"),
        (lambda: engine.generate(p, GREEDY, cache_salt=["a", 2]), TypeError,
         "prompt 1: cache_salt must be None, a str or bytes"),
        (lambda: engine.generate(p, GREEDY, cache_salt={"a"}), TypeError,
         r"cache_salt must be str or bytes \(or a list of them"),
        (lambda: list(engine.stream(p[0], GREEDY, cache_salt=1.0)), TypeError, "cache_salt"),
    ]  # fmt: skip
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        assert state(engine) == before


def test_breaking_out_of_a_stream_aborts_the_request(engine):
    p = prompts_of((9,), seed=2)[0]
    for delta in engine.stream(p, GREEDY):
        assert delta.text is None  # no tokenizer: tokens only
        break
    assert not engine.has_unfinished() and not engine.core.requests
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()


# ------------------------------------------------------------------ cache salts
def test_salts_share_kv_only_within_a_salt(engine):
    p = prompts_of((40,), seed=3)[0]  # 5 full blocks of 8; 32 tokens can be hits
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    first = engine.generate([p], sp, cache_salt="tenant-a")[0]
    assert first.num_cached_tokens == 0
    # neither blocks nor the stored last-position logits (zero-compute repeats) cross salts
    for other in ("tenant-b", b"tenant-a", None):  # bytes and str salts differ too
        assert engine.generate([p], sp, cache_salt=other)[0].num_cached_tokens == 0
    again = engine.generate([p], sp, cache_salt="tenant-a")[0]  # a repeat: all 40 cached
    assert again.num_cached_tokens == 40 and again.token_ids == first.token_ids
    assert engine.generate([p], sp)[0].num_cached_tokens == 40  # None is a namespace too
    # per prompt, in one call: requests admitted in the same step share within a salt only
    outs = engine.generate([p, p, p], sp, cache_salt=["c", "d", "c"])
    assert [o.num_cached_tokens for o in outs] == [0, 0, 32]
    assert all(o.token_ids == first.token_ids for o in outs)
    engine.cache.check_integrity()


def test_salts_stay_apart_in_a_cpu_tier(model):
    plain = Engine(model, num_blocks=16, block_size=BS)
    tier = CPUTier(64 * plain.cache.layout.bytes_per_block)
    engine = Engine(model, num_blocks=16, block_size=BS, tiers=[tier])
    p = prompts_of((40,), seed=4)[0]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    first = engine.generate([p], sp, cache_salt="a")[0]
    engine.generate(prompts_of((120,), seed=5), sp)  # evicts p's blocks into the tier
    assert engine.cache.stats().evictions > 0
    assert engine.cache.manager.lookup(p, "a") == 0  # nothing of p is left on the device
    hits = engine.cache.tier_stats()["tier_hit_tokens"]
    other = engine.generate([p], sp, cache_salt="b")[0]
    assert other.num_cached_tokens == 0
    assert engine.cache.tier_stats()["tier_hit_tokens"] == hits  # the tier found nothing
    engine.generate(prompts_of((120,), seed=6), sp)  # evict again (b's copy included)
    assert engine.cache.manager.lookup(p, "a") == 0
    same = engine.generate([p], sp, cache_salt="a")[0]
    assert same.num_cached_tokens == 32 and same.token_ids == first.token_ids
    assert engine.cache.tier_stats()["tier_hit_tokens"] == hits + 32  # loaded from the tier
    engine.cache.check_integrity()
    engine.cache.close()


def test_a_swapped_out_request_keeps_its_salt(model):
    probe = Engine(model, num_blocks=6, block_size=BS)
    tier = CPUTier(64 * probe.cache.layout.bytes_per_block)
    engine = Engine(model, num_blocks=6, block_size=BS, tiers=[tier], preemption="swap")
    p, q = prompts_of((16, 16), seed=9)
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True)  # 32 tokens each: 4 of 6 blocks
    ids = {
        engine.add_request(p, sp, cache_salt="a"): "a",
        engine.add_request(q, sp, cache_salt="b"): "b",
    }
    reqs = [engine.core.requests[rid] for rid in ids]
    seen, outs = set(), {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
        for r in engine.scheduler.running:
            if r.num_preemptions:  # swapped out and back in: still under its own salt
                seen.add((r.request_id, engine.cache.salt(r.seq_id)))
    assert engine.stats().preemptions > 0 and seen
    assert all(salt == ids[rid] for rid, salt in seen)
    one = SamplingParams(max_new_tokens=1)
    for r in reqs:  # its KV (on the device or in the tier now) serves only its own salt
        history, salt = r.prompt + r.output, ids[r.request_id]
        other = "b" if salt == "a" else "a"
        assert engine.generate([history], one, cache_salt=other)[0].num_cached_tokens == 0
        assert engine.generate([history], one, cache_salt=salt)[0].num_cached_tokens == 24
    engine.cache.check_integrity()
    engine.cache.close()


def test_a_snapshot_keeps_its_salt(model, tmp_path):
    p = prompts_of((21,), seed=7)[0]
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    a = Engine(model, num_blocks=32, block_size=BS, snapshot_store=tmp_path)
    first = a.generate([p], sp, retain=True, cache_salt="a")[0]
    a.snapshot(first, "chat")
    assert SnapshotStore(tmp_path).manifest("chat").sequences[0].salt == "a"
    b = Engine(model, num_blocks=32, block_size=BS, snapshot_store=tmp_path)
    before = state(b)
    for wrong in (None, "b", b"a"):
        with pytest.raises(SnapshotError, match="another cache_salt namespace"):
            b.resume("chat", [], sp, cache_salt=wrong)
        assert state(b) == before
    with pytest.raises(TypeError, match="cache_salt"):
        b.resume("chat", [], sp, cache_salt=3)
    assert state(b) == before
    rest = b.resume("chat", [], sp, cache_salt="a", retain=True)
    assert rest.num_cached_tokens == 21 + 6 - 1
    assert b.cache.salt(rest.request_id) == "a"  # resumed under the snapshot's salt
    b.release(rest)
    history = rest.prompt_token_ids + rest.token_ids
    # the resumed KV (now in b's prefix cache) serves salt "a" only
    assert b.generate([history], sp, cache_salt="b")[0].num_cached_tokens == 0
    assert b.generate([history], sp)[0].num_cached_tokens == 0
    assert b.generate([history], sp, cache_salt="a")[0].num_cached_tokens == 32
    b.cache.check_integrity()


def test_the_engine_logs_at_boundaries_not_per_token(model, caplog, monkeypatch):
    with caplog.at_level(logging.DEBUG, logger="pagedkv.engine"):
        engine = Engine(model, num_blocks=6, block_size=BS)  # 48 tokens
        sp = SamplingParams(max_new_tokens=16, ignore_eos=True)
        outs = engine.generate(prompts_of((16, 16), seed=8), sp)
    records = [r for r in caplog.records if r.name == "pagedkv.engine"]
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("engine ready: llama on cpu") for m in messages)
    assert engine.stats().preemptions > 0  # 32 tokens each do not fit together
    assert any("preempted" in m and r.levelno == logging.DEBUG for m, r in zip(messages, records))
    assert len(records) < sum(len(o.token_ids) for o in outs)  # not one per token

    def fail(chunks):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "launch", fail)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pagedkv.engine"):
        out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2))[0]
    assert out.finish_reason == "error" and "device lost" in out.error
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "RuntimeError: device lost" in warned[0].getMessage()
