"""Engine correctness on tiny random models: token-identical to transformers' generate()."""

from __future__ import annotations

import pytest
import torch
import transformers

from _models import tiny
from pagedkv.engine import Engine, SamplingParams
from pagedkv.errors import UnsupportedModelError

NEW = 40
LENGTHS = (5, 17, 33, 9, 48)


pytestmark = pytest.mark.usefixtures("single_thread")


def prompts_of(lengths=LENGTHS, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompts, new=NEW):
    """transformers' generate() with its default cache, one prompt at a time."""
    model.set_attn_implementation("sdpa")
    outs = []
    for p in prompts:
        o = model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        outs.append(o[0, len(p) :].tolist())
    return outs


GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def llama():
    model = tiny("llama")
    prompts = prompts_of(prefix=list(range(100, 140)))  # 40 shared tokens
    return model, prompts, reference(model, prompts)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_matches_transformers(family):
    model = tiny(family)
    prompts = prompts_of()
    ref = reference(model, prompts)
    engine = Engine(model, num_blocks=128, block_size=8)
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" for o in outs)
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()


@pytest.mark.parametrize(
    "options",
    [
        dict(prefix_caching=False),
        dict(prefix_caching=True),
        dict(max_batch_tokens=7),  # chunked prefill: prompts span several steps
        dict(num_blocks=40, block_size=4),  # tiny pool: preemption by recompute
        dict(max_num_seqs=2),
    ],
    ids=["no-prefix", "prefix", "chunked", "preempt", "two-seqs"],
)
def test_scheduling_variants_give_identical_outputs(llama, options):
    model, prompts, ref = llama
    engine = Engine(model, **{"num_blocks": 128, "block_size": 8, **options})
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    stats = engine.stats()
    if options.get("prefix_caching"):
        assert stats.cached_tokens >= 4 * 40 - 8  # later prompts reuse the shared prefix
        assert stats.prefill_tokens < stats.prompt_tokens
    if "num_blocks" in options:
        assert stats.preemptions > 0
    engine.cache.check_integrity()
    assert stats.blocks_in_use == 0


def test_preemption_by_swap(llama):
    from pagedkv import tiers

    model, prompts, ref = llama
    engine = Engine(
        model, num_blocks=40, block_size=4, preemption="swap", tiers=[tiers.CPUTier(8 << 20)]
    )
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert engine.stats().preemptions > 0


@pytest.mark.parametrize("repeat_cache_bytes", [0, 2**20])
def test_cached_token_report_and_second_round_hits(llama, repeat_cache_bytes):
    model, prompts, ref = llama
    engine = Engine(model, num_blocks=128, block_size=8, repeat_cache_bytes=repeat_cache_bytes)
    first = engine.generate(prompts[:1], GREEDY)
    again = engine.generate(prompts[:1], GREEDY)
    assert first[0].num_cached_tokens == 0
    # without stored logits, everything but the last (partial) block is served from the
    # cache; with them, the whole prompt (tests/test_engine_repeats.py)
    n = len(prompts[0])
    assert again[0].num_cached_tokens == (n if repeat_cache_bytes else (n - 1) // 8 * 8)
    assert again[0].token_ids == first[0].token_ids == ref[0]


def test_stop_tokens_eos_and_stream(llama):
    model, prompts, ref = llama
    engine = Engine(model, num_blocks=128, block_size=8)
    stop = ref[0][5]
    cut = ref[0].index(stop) + 1
    out = engine.generate(prompts[:1], SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop,)))
    assert out[0].token_ids == ref[0][:cut] and out[0].finish_reason == "stop"
    model.generation_config.eos_token_id = stop
    try:
        eos_engine = Engine(model, num_blocks=128, block_size=8)
        out = eos_engine.generate(prompts[:1], SamplingParams(max_new_tokens=NEW))
        assert out[0].token_ids == ref[0][:cut] and out[0].finish_reason == "stop"
        out = eos_engine.generate(prompts[:1], GREEDY)  # ignore_eos
        assert out[0].token_ids == ref[0]
    finally:
        model.generation_config.eos_token_id = None
    deltas = list(engine.stream(prompts[1], SamplingParams(max_new_tokens=7)))
    assert [t for d in deltas for t in d.token_ids] == ref[1][:7]
    assert deltas[-1].finish_reason == "length"


def test_seeded_sampling_is_batch_invariant_and_top_k_1_is_greedy(llama):
    model, prompts, ref = llama
    engine = Engine(model, num_blocks=128, block_size=8)
    sp = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    alone = engine.generate(prompts[:1], sp)[0].token_ids
    mixed = engine.generate(
        prompts, [sp] + [SamplingParams(max_new_tokens=12, temperature=1.0)] * 4
    )
    assert mixed[0].token_ids == alone
    top1 = SamplingParams(max_new_tokens=NEW, temperature=1.5, top_k=1, ignore_eos=True)
    assert engine.generate(prompts[:1], top1)[0].token_ids == ref[0]


def test_bad_inputs_raise_and_engine_keeps_serving(llama):
    model, prompts, ref = llama
    engine = Engine(model, num_blocks=16, block_size=8)
    good = engine.add_request(prompts[0], GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 2, 256], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([-1], GREEDY)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(list(range(3, 200)), GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("hello", GREEDY)
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([prompts[1], []], GREEDY)
    done = []
    while engine.has_unfinished():
        done += engine.step()
    assert [o.request_id for o in done] == [good]
    assert done[0].token_ids == ref[0]
    assert engine.generate(prompts[1:2], GREEDY)[0].token_ids == ref[1]


def test_unsupported_model_is_refused():
    """(Every refused kind: test_families_support.py; sliding windows run: test_families.py.)"""
    cfg = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(UnsupportedModelError, match="bloom.*attention interface"):
        Engine(transformers.BloomForCausalLM(cfg), num_blocks=8)
