"""The engine's speed paths change no output: overlap scheduling (step n+1 launched before
step n's tokens are read) and cascade decode (shared prefix blocks read once per group),
each on and off, give the same greedy tokens as transformers' generate() on CPU; and
Engine.warmup() leaves the cache as it was."""

from __future__ import annotations

import itertools

import pytest
import torch

from _models import tiny
from pagedkv import ops
from pagedkv.engine import Engine, SamplingParams
from test_engine import prompts_of, reference

pytestmark = pytest.mark.usefixtures("single_thread")

NEW = 12
PREFIX = list(range(100, 132))  # 32 shared tokens: 4 full blocks of 8
MODES = list(itertools.product([False, True], [False, True]))  # (overlap, cascade)
IDS = [f"overlap={o}-cascade={c}" for o, c in MODES]


@pytest.fixture(scope="module")
def case():
    model = tiny("llama")
    # one prompt first so its prefix is cached when the others are admitted (they then
    # hold the same physical prefix blocks: a cascade group); one unrelated prompt
    prompts = prompts_of([3, 9, 1, 14, 6], seed=5, prefix=PREFIX) + prompts_of([11], seed=6)
    return model, prompts, reference(model, prompts, NEW)


class CountCascade:
    """Counts the calls of ops.cascade_decode (the engine's grouped decode)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ops.cascade_decode

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ops, "cascade_decode", counted)


@pytest.mark.parametrize(("overlap", "cascade"), MODES, ids=IDS)
def test_greedy_tokens_are_the_same_in_every_mode(case, monkeypatch, overlap, cascade):
    model, prompts, ref = case
    counter = CountCascade(monkeypatch)
    engine = Engine(model, num_blocks=64, block_size=8, overlap=overlap, cascade=cascade)
    assert engine.core.overlap is overlap
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    first = engine.generate(prompts[:1], params)
    outs = first + engine.generate(prompts[1:], params)
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" and len(o.token_ids) == NEW for o in outs)
    # cascade decode ran where it was asked for (shared blocks, > 1 row), never otherwise
    assert (counter.calls > 0) is cascade
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_tokens_and_lengths_finish_at_the_same_token_with_overlap(case, overlap):
    """With overlap a request finishing on a stop token was already given a row of the
    next step: that row's token must never be emitted, and no block may leak."""
    model, prompts, ref = case
    engine = Engine(model, num_blocks=64, block_size=8, overlap=overlap)
    stops = [SamplingParams(max_new_tokens=NEW, stop_token_ids=[r[k]], ignore_eos=True)
             for r, k in zip(ref, itertools.cycle([2, 0, 5, 7]))]  # fmt: skip
    outs = engine.generate(prompts, stops)
    for o, r, k in zip(outs, ref, itertools.cycle([2, 0, 5, 7])):
        cut = r.index(r[k]) + 1  # the first occurrence of the stop token ends it
        assert o.token_ids == r[:cut] and o.finish_reason == "stop"
    lengths = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (1, 2, 5, 9, 3, 12)]
    outs = engine.generate(prompts, lengths)
    assert [o.token_ids for o in outs] == [r[:n] for r, n in zip(ref, (1, 2, 5, 9, 3, 12))]
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()


def test_overlap_streams_aborts_and_preempts_like_the_plain_loop(case):
    model, prompts, ref = case
    # a pool too small for all six at once: preemption (recompute) while overlapping
    engine = Engine(model, num_blocks=12, block_size=8, overlap=True, prefix_caching=False)
    long = reference(model, prompts, 2 * NEW)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=2 * NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == long
    assert engine.stats().preemptions > 0
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    # streaming: deltas arrive a step late but join to the same tokens
    deltas = list(engine.stream(prompts[3], params))
    assert [t for d in deltas for t in d.token_ids] == ref[3]
    # abort while a step is in flight: nothing leaks, the others are unaffected
    keep = engine.add_request(prompts[1], params)
    drop = engine.add_request(prompts[2], params)
    for _ in range(3):
        engine.step()
    engine.abort(drop)
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step())
    assert drop not in done and done[keep].token_ids == ref[1]
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()


def test_warmup_compiles_without_touching_the_cache(case):
    model, prompts, ref = case
    engine = Engine(model, num_blocks=32, block_size=8)
    before = engine.cache.pool.kv.clone()
    stats = engine.stats()
    warm = engine.warmup()
    assert warm.forwards > 0 and warm.seconds >= 0 and warm.graphs == 0  # no graphs on CPU
    assert torch.equal(engine.cache.pool.kv, before), "warm-up wrote to the KV pool"
    assert engine.stats().blocks_in_use == stats.blocks_in_use == 0
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in engine.generate(prompts[:2], params)] == ref[:2]


def test_a_retained_request_parks_and_resumes_the_same_with_overlap(case, tmp_path):
    """A request that stops (EOS-like stop token) while its next row is already launched:
    the snapshot holds exactly its counted tokens, and resuming continues identically."""
    model, prompts, ref = case
    stop = SamplingParams(max_new_tokens=NEW, stop_token_ids=[ref[1][4]], ignore_eos=True)
    cut = ref[1].index(ref[1][4]) + 1
    results = []
    for overlap in (False, True):
        engine = Engine(model, num_blocks=64, block_size=8, overlap=overlap,
                        snapshot_store=tmp_path / str(overlap))  # fmt: skip
        first = engine.generate([prompts[1]], stop, retain=True)[0]
        assert first.token_ids == ref[1][:cut] and first.finish_reason == "stop"
        info = engine.snapshot(first, "s")
        assert info.num_tokens == len(prompts[1]) + cut - 1  # the last token has no KV yet
        rest = engine.resume("s", [], SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert engine.stats().blocks_in_use == 0
        engine.cache.check_integrity()
        results.append(rest.token_ids)
    assert results[0] == results[1]
