"""Engine.snapshot / Engine.resume: park a conversation, continue it token-identically."""

from __future__ import annotations

import pytest
import torch

import _models
from pagedkv.engine import Engine, SamplingParams
from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot import SnapshotStore

N1, N2 = 10, 12


# every test on one thread, in batch-invariant mode (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("invariant_one_thread")


def tiny(family: str = "llama", layers: int = 2):
    """The same weights for every call of a family (seed 0)."""
    return _models.tiny(family, layers=layers, seed=0)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_park_and_resume_on_another_engine_is_token_identical(model, tmp_path):
    p = prompt(13)
    ref = Engine(model, num_blocks=64, block_size=8).generate([p], greedy(N1 + N2))[0]
    a = Engine(model, num_blocks=64, block_size=8, snapshot_store=tmp_path)
    first = a.generate([p], greedy(N1), retain=True)[0]
    assert a.stats().retained_seqs == 1 and a.stats().blocks_in_use == 3  # 22 tokens with KV
    info = a.snapshot(first, "chat", metadata={"user": "ada"})
    assert info.num_tokens == 13 + N1 - 1 and info.metadata["user"] == "ada"
    assert a.stats().retained_seqs == 0 and a.stats().blocks_in_use == 0
    # "another machine": a fresh model object, a differently sized pool, the same directory
    b = Engine(tiny(), num_blocks=24, block_size=8, snapshot_store=str(tmp_path))
    rest = b.resume("chat", [], greedy(N2))
    assert first.token_ids + rest.token_ids == ref.token_ids
    assert rest.prompt_token_ids == p + first.token_ids
    assert rest.num_cached_tokens == 13 + N1 - 1
    assert b.stats().prefill_tokens == 1  # only the last sampled token was computed
    assert b.stats().blocks_in_use == 0
    b.cache.check_integrity()
    # the snapshot stays: resuming it again (here, in the first engine) gives the same
    assert a.resume("chat", params=greedy(N2)).token_ids == rest.token_ids
    streamed = list(b.resume_stream("chat", [], greedy(N2)))
    assert [t for d in streamed for t in d.token_ids] == rest.token_ids
    assert streamed[-1].finish_reason == "length"


def test_next_turns_match_a_fresh_engine_given_the_whole_history(model, tmp_path):
    store = SnapshotStore(tmp_path)
    p, turn2, turn3 = prompt(21, 1), prompt(7, 2), prompt(12, 3)
    a = Engine(model, num_blocks=64, block_size=8, max_batch_tokens=16)  # chunked prefill
    b = Engine(tiny(), num_blocks=32, block_size=8)
    first = a.generate([p], greedy(N1), retain=True)[0]
    a.snapshot(first.request_id, "t1", store=store)
    second = b.resume("t1", turn2, greedy(N2), store=store, retain=True)
    history = p + first.token_ids + turn2
    assert second.prompt_token_ids == history
    fresh = Engine(model, num_blocks=64, block_size=8)
    assert second.token_ids == fresh.generate([history], greedy(N2))[0].token_ids
    b.snapshot(second, "t2", store=store)  # park again after the second turn
    third = a.resume("t2", turn3, greedy(N1), store=store)
    history += second.token_ids + turn3
    assert third.token_ids == fresh.generate([history], greedy(N1))[0].token_ids
    for e in (a, b):
        assert e.stats().blocks_in_use == 0 and e.stats().retained_seqs == 0
        e.cache.check_integrity()


def test_seeded_sampling_continues_its_random_stream(model, tmp_path):
    p = prompt(9, 4)
    sp = dict(temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    e = Engine(model, num_blocks=64, block_size=8, snapshot_store=tmp_path)
    ref = e.generate([p], SamplingParams(max_new_tokens=N1 + N2, **sp))[0].token_ids
    first = e.generate([p], SamplingParams(max_new_tokens=N1, **sp), retain=True)[0]
    e.snapshot(first, "s")
    rest = e.resume("s", [], SamplingParams(max_new_tokens=N2, **sp))
    assert first.token_ids + rest.token_ids == ref
    # default params are the snapshot's own (here: N1 more tokens, same seed, same stream)
    assert e.resume("s").token_ids == ref[N1 : 2 * N1]


def test_resume_continues_while_other_requests_run(model, tmp_path):
    p, others = prompt(11, 5), [prompt(n, 6 + n) for n in (5, 30)]
    e = Engine(model, num_blocks=64, block_size=8, snapshot_store=tmp_path)
    ref = e.generate([p], greedy(N1 + N2))[0].token_ids
    first = e.generate([p], greedy(N1), retain=True)[0]
    e.snapshot(first, "c")
    ids = [e.add_request(o, greedy(N2)) for o in others]
    assert e.resume("c", [], greedy(N2)).token_ids == ref[N1:]
    while e.has_unfinished():
        e.step()
    for rid in ids:
        e.abort(rid)
    assert e.stats().blocks_in_use == 0


def test_errors_are_clear_and_the_engine_keeps_serving(model, tmp_path):
    p = prompt(10, 7)
    e = Engine(model, num_blocks=64, block_size=8, snapshot_store=tmp_path)
    ref = e.generate([p], greedy(4))[0]
    with pytest.raises(KeyError, match="not retained"):
        e.snapshot(ref, "x")  # finished but submitted without retain=True
    with pytest.raises(KeyError, match="not retained"):
        e.snapshot(12345, "x")
    with pytest.raises(KeyError, match="not retained"):
        e.release(12345)
    with pytest.raises(ValueError, match="no snapshot store"):
        Engine(model, num_blocks=8, block_size=8).resume("x")
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        e.resume("nope")
    out = e.generate([p], greedy(4), retain=True)[0]
    e.snapshot(out, "p")
    other = Engine(tiny("qwen2"), num_blocks=64, block_size=8, snapshot_store=tmp_path)
    with pytest.raises(SnapshotError, match="same model"):
        other.resume("p")
    wider = Engine(model, num_blocks=64, block_size=16, snapshot_store=tmp_path)
    with pytest.raises(SnapshotError, match="block_size 8"):
        wider.resume("p")
    deeper = Engine(tiny(layers=3), num_blocks=64, block_size=8, snapshot_store=tmp_path)
    with pytest.raises(SnapshotError, match="3 layers"):
        deeper.resume("p")
    with SnapshotStore(tmp_path) as store:  # a snapshot saved without the engine
        e.generate([p], greedy(2), retain=True)
        rid = next(iter(e.core.retained))
        store.save(e.cache, [rid], name="raw")
        e.release(rid)
    with pytest.raises(SnapshotError, match="not saved by Engine.snapshot"):
        e.resume("raw")
    assert e.generate([p], greedy(4))[0].token_ids == ref.token_ids
    for engine in (e, other, wider, deeper):
        assert engine.stats().blocks_in_use == 0
        assert engine.generate([p], greedy(4))[0].finish_reason == "length"
        engine.cache.check_integrity()


def test_retained_sequences_count_against_the_pool(model, tmp_path):
    e = Engine(model, num_blocks=6, block_size=8, snapshot_store=tmp_path)
    kept = e.generate([prompt(20, 8)], greedy(5), retain=True)[0]  # 24 tokens: 3 blocks
    e.snapshot(kept, "kept", keep=True)  # saved, and still held
    assert e.stats().retained_seqs == 1 and e.stats().blocks_in_use == 3
    blocked = e.generate([prompt(30, 9)], greedy(4))[0]  # needs 4 blocks now, 3 are free
    assert blocked.finish_reason == "error" and "retained" in blocked.error
    e.abort(kept.request_id)  # abort releases a retained sequence too
    assert e.stats().retained_seqs == 0 and e.stats().blocks_in_use == 0
    assert e.generate([prompt(30, 9)], greedy(4))[0].finish_reason == "length"
    e.cache.check_integrity()

    f = Engine(model, num_blocks=6, block_size=8, snapshot_store=tmp_path)
    big = f.generate([prompt(28, 10)], greedy(5), retain=True)[0]  # 32 tokens: 4 blocks
    with pytest.raises(OutOfBlocks, match="no room to resume snapshot 'kept'"):
        f.resume("kept", [], greedy(2))  # needs 3 blocks, 2 are free
    f.cache.check_integrity()
    assert f.stats().blocks_in_use == 4 and not f.has_unfinished()
    f.release(big)
    assert f.resume("kept", [], greedy(2)).finish_reason == "length"
    assert f.stats().blocks_in_use == 0
    f.cache.check_integrity()


def test_other_weights_of_the_same_config_never_reuse_the_kv(model, tmp_path):
    """A fine-tune (same config, other weights) gets another fingerprint: no resume."""
    tuned = tiny()
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    a = Engine(model, num_blocks=64, snapshot_store=tmp_path)
    b = Engine(tuned, num_blocks=64, snapshot_store=tmp_path)
    assert a.cache.fingerprint != b.cache.fingerprint
    assert Engine(tiny(), num_blocks=64).cache.fingerprint == a.cache.fingerprint
    out = a.generate([prompt(20)], greedy(4), retain=True)[0]
    a.snapshot(out, "weights-a")
    with pytest.raises(SnapshotError, match="saved from model 'llama-"):
        b.resume("weights-a", (), greedy(4))
    pinned = Engine(tuned, num_blocks=64, model_version="rev-7")
    assert pinned.cache.fingerprint != b.cache.fingerprint
