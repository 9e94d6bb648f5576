"""Engine.update_weights: no KV of the old weights is used again (device, CPU / disk /
Redis tiers, snapshots), outputs equal a fresh engine on the new weights, requests in
flight are recomputed or continue, bad arguments change nothing."""

from __future__ import annotations

import pytest
import torch

from _models import tiny
from pagedkv.engine import Engine, SamplingParams
from pagedkv.errors import SnapshotError
from pagedkv.events import AllBlocksCleared
from pagedkv.tiers import CPUTier, DiskTier, RedisTier
from test_engine import prompts_of

pytestmark = pytest.mark.usefixtures("single_thread")

NEW = SamplingParams(max_new_tokens=6, ignore_eos=True)
OLD_SEED, NEW_SEED = 11, 12
SYSTEM = list(range(100, 164))  # 64 tokens: 8 full blocks of 8


def new_weights() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny("llama", seed=NEW_SEED).state_dict().items()}


def fresh_outputs(prompts: list[list[int]], params: SamplingParams = NEW) -> list[list[int]]:
    """What an engine built on the new weights generates."""
    with Engine(tiny("llama", seed=NEW_SEED), num_blocks=64, block_size=8) as engine:
        return [o.token_ids for o in engine.generate(prompts, params)]


def make_tiers(where: str, tmp_path, request, bytes_per_block: int):
    if where == "device":
        return None
    if where == "cpu":
        return [CPUTier(256 * bytes_per_block)]
    if where == "disk":
        return [DiskTier(tmp_path / "kv", 256 * bytes_per_block)]
    url = request.getfixturevalue("redis_url")
    return [RedisTier(url, timeout_s=0.5, retry_initial_s=0.05, retry_max_s=0.2)]


@pytest.mark.parametrize("where", ["device", "cpu", "disk", "redis"])
def test_a_repeated_prompt_reuses_nothing_of_the_old_weights(where, tmp_path, request):
    probe = Engine(tiny("llama", seed=OLD_SEED), num_blocks=8, block_size=8)
    tiers = make_tiers(where, tmp_path, request, probe.cache.layout.bytes_per_block)
    probe.close()
    engine = Engine(tiny("llama", seed=OLD_SEED), num_blocks=40, block_size=8, tiers=tiers)
    prompt = SYSTEM + prompts_of((9,), seed=3)[0]
    engine.generate([prompt], NEW)
    if where != "device":  # unrelated traffic evicts the prompt down to the tier
        engine.generate(prompts_of((150, 150), seed=4), NEW)
    engine.cache.flush()
    before = engine.cache.explain(prompt)
    source = "device" if where == "device" else f"tier:{engine.cache.tiers.levels[0].name}"
    assert before.cached_tokens >= len(SYSTEM) and before.blocks[0] == source, before
    tier_hits = engine.cache.tier_stats()["tier_hit_tokens"] if tiers else 0

    cleared = []
    engine.subscribe(cleared.extend)
    assert engine.update_weights(new_weights()) is True
    assert cleared == [AllBlocksCleared("device")]
    after = engine.cache.explain(prompt)
    assert after.cached_tokens == 0 and after.first_miss == 0, after
    out = engine.generate([prompt], NEW)[0]
    assert out.num_cached_tokens == 0
    assert out.token_ids == fresh_outputs([prompt])[0]
    if tiers:  # nothing came back from the tier either
        assert engine.cache.tier_stats()["tier_hit_tokens"] == tier_hits
    again = engine.generate([prompt], NEW)[0]  # the new weights' KV is cached as usual
    assert again.num_cached_tokens >= len(SYSTEM) and again.token_ids == out.token_ids
    engine.cache.check_integrity()
    engine.close()


def test_running_requests_are_recomputed_on_the_new_weights():
    engine = Engine(tiny("llama", seed=OLD_SEED), num_blocks=64, block_size=8)
    prompts = prompts_of((20, 13), seed=5)
    ids = [engine.add_request(p, NEW) for p in prompts]
    for _ in range(3):  # prefill, then two decode steps
        engine.step()
    reqs = [engine.core.requests[i] for i in ids]
    done_before = [list(r.output) for r in reqs]
    assert all(len(o) == 3 for o in done_before)
    prefill = engine.stats().prefill_tokens
    engine.update_weights(new_weights())  # running="recompute"
    s = engine.stats()
    assert s.running_requests == 0 and s.waiting_requests == 2 and s.preemptions == 0
    while engine.has_unfinished():
        engine.step()
    outs = [engine.core.take(i) for i in ids]
    # every token of each request was computed again in one prefill, none reused (the
    # last sampled one, whose KV a decode step would have computed, included)
    recomputed = sum(len(p) + len(o) for p, o in zip(prompts, done_before))
    assert engine.stats().prefill_tokens - prefill == recomputed
    # the tokens after the update are what the new weights generate after those before
    cont = SamplingParams(max_new_tokens=3, ignore_eos=True)
    expected = fresh_outputs([p + o for p, o in zip(prompts, done_before)], cont)
    assert [o.token_ids[3:] for o in outs] == expected
    assert [o.token_ids[:3] for o in outs] == done_before
    engine.cache.check_integrity()
    engine.close()


def test_continue_keeps_running_requests_and_caches_none_of_their_mixed_kv():
    engine = Engine(tiny("llama", seed=OLD_SEED), num_blocks=64, block_size=8)
    prompt = SYSTEM + [7, 8, 9]
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    engine.step()
    prefill = engine.stats().prefill_tokens
    engine.update_weights(new_weights(), running="continue")
    assert engine.stats().running_requests == 1
    while engine.has_unfinished():
        engine.step()
    assert len(engine.core.take(rid).token_ids) == 12
    assert engine.stats().prefill_tokens == prefill  # nothing was recomputed
    out = engine.generate([prompt], NEW)[0]  # and nothing of it is found now
    assert out.num_cached_tokens == 0 and out.token_ids == fresh_outputs([prompt])[0]
    engine.close()


def test_retained_requests_of_the_old_weights_cannot_be_snapshotted(tmp_path):
    engine = Engine(tiny("llama", seed=OLD_SEED), num_blocks=64, block_size=8,
                    snapshot_store=tmp_path / "snaps")  # fmt: skip
    out = engine.generate([SYSTEM], NEW, retain=True)[0]
    engine.update_weights(model_version="v2")
    with pytest.raises(SnapshotError, match="before the weights were updated"):
        engine.snapshot(out)
    engine.release(out)
    fresh = engine.generate([SYSTEM], NEW, retain=True)[0]
    assert engine.snapshot(fresh, "after").name == "after"  # KV of the new weights saves
    engine.close()


def test_versions_declared_and_derived():
    engine = Engine(tiny("llama", seed=OLD_SEED), num_blocks=32, block_size=8)
    prompt = SYSTEM[:24]
    fingerprints = [engine.cache.model_fingerprint]
    assert engine.update_weights(model_version="v2") is True
    fingerprints.append(engine.cache.model_fingerprint)
    assert engine.update_weights(model_version="v2") is False  # already v2: nothing changes
    with pytest.raises(ValueError, match="is the current one"):
        engine.update_weights(new_weights(), model_version="v2")
    # the same version gives the same fingerprint in another engine (tiers shared)
    other = Engine(tiny("llama", seed=NEW_SEED), num_blocks=8, block_size=8, model_version="v2")
    assert other.cache.model_fingerprint == fingerprints[-1]
    other.close()
    engine.generate([prompt], NEW)
    assert engine.update_weights() is True  # declared changed, weights as they were
    fingerprints.append(engine.cache.model_fingerprint)
    assert engine.update_weights() is True  # each declaration is a new fingerprint
    fingerprints.append(engine.cache.model_fingerprint)
    assert len(set(fingerprints)) == 4
    assert engine.generate([prompt], NEW)[0].num_cached_tokens == 0
    assert engine.cache.stats().invalidated_blocks > 0  # old blocks wait to be evicted
    engine.close()


def test_bad_arguments_change_nothing():
    model = tiny("llama", seed=OLD_SEED)
    engine = Engine(model, num_blocks=32, block_size=8)
    engine.generate([SYSTEM[:24]], NEW)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint = engine.cache.model_fingerprint
    good = new_weights()
    name = next(iter(good))
    bad = [
        ({**good, "nope.weight": torch.zeros(1)}, {}, KeyError, "does not have"),
        ({**good, name: torch.zeros(3)}, {}, ValueError, "has shape"),
        ({**good, name: good[name].long()}, {}, ValueError, "the model's is"),
        ({**good, name: [1.0]}, {}, TypeError, "must be a torch.Tensor"),
        ([1, 2], {}, TypeError, "must be a mapping"),
        (good, {"running": "later"}, ValueError, "running must be one of"),
        (good, {"model_version": 3}, TypeError, "model_version must be a str"),
        (good, {"model_version": ""}, ValueError, "must not be empty"),
    ]
    for state_dict, kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            engine.update_weights(state_dict, **kwargs)
    assert engine.cache.model_fingerprint == fingerprint
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert engine.generate([SYSTEM[:24]], NEW)[0].num_cached_tokens > 0
    engine.close()
    with pytest.raises(Exception, match="closed"):
        engine.update_weights(good)


def test_a_load_that_fails_midway_still_retires_the_old_kv(monkeypatch):
    engine = Engine(tiny("llama", seed=OLD_SEED), num_blocks=32, block_size=8)
    engine.generate([SYSTEM[:24]], NEW)
    before = engine.cache.model_fingerprint
    good = new_weights()

    def copy_then_fail(model, tensors):  # as if the copy died after some tensors
        raise RuntimeError("out of memory loading the last tensor")

    monkeypatch.setattr("pagedkv.engine.weights.load_in_place", copy_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.update_weights(good)
    assert engine.cache.model_fingerprint != before  # some weights changed: nothing reused
    assert engine.generate([SYSTEM[:24]], NEW)[0].num_cached_tokens == 0
    engine.close()


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_update_weights_on_cuda_keeps_captured_graphs_valid(cuda_graphs):
    """Weights are copied into the model's own storage, so CUDA graphs captured before
    the update compute with the new weights (no re-capture needed)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = prompts_of((20, 13, 30), seed=6)
    engine = Engine(tiny("llama", seed=OLD_SEED).cuda(), num_blocks=128, block_size=8,
                    cuda_graphs=cuda_graphs)  # fmt: skip
    engine.generate(prompts, NEW)  # captures the decode graphs under the old weights
    engine.update_weights({k: v.cuda() for k, v in new_weights().items()})
    outs = engine.generate(prompts, NEW)
    fresh = Engine(tiny("llama", seed=NEW_SEED).cuda(), num_blocks=128, block_size=8,
                   cuda_graphs=cuda_graphs)  # fmt: skip
    assert [o.token_ids for o in outs] == [o.token_ids for o in fresh.generate(prompts, NEW)]
    assert all(o.num_cached_tokens == 0 for o in outs)
    engine.close()
    fresh.close()
