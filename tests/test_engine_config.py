"""EngineConfig is the one source of the engine's options: defaults, checks, overrides."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from _models import tiny
from pagedkv.engine import Engine, EngineConfig, SamplingParams
from pagedkv.engine import config as config_module
from pagedkv.engine.config import option_fields

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


def test_every_option_has_a_default_a_type_and_help():
    names = [f.name for f in option_fields()]
    assert names == [
        "num_blocks", "gpu_memory_fraction", "block_size", "max_batch_tokens", "max_num_seqs",
        "prefix_caching", "preemption", "preemption_policy", "cuda_graphs", "cpu_kv_bytes",
        "repeat_cache_bytes",
        "batch_invariant", "kv_dtype",
        "overlap", "cascade", "torch_compile", "warmup",
    ]  # fmt: skip
    for f in option_fields():
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata["help"].strip(), f.name
    c = EngineConfig()
    assert (c.num_blocks, c.gpu_memory_fraction, c.block_size, c.max_batch_tokens) == (
        None, 0.8, 16, 8192,
    )  # fmt: skip
    assert (c.max_num_seqs, c.prefix_caching, c.preemption, c.cuda_graphs) == (
        256, True, "recompute", True,
    )  # fmt: skip
    assert c.preemption_policy == "newest" and c.policy.name == "newest"
    assert c.cpu_kv_bytes == 512 * 2**20 and c.repeat_cache_bytes == 64 * 2**20
    assert c.batch_invariant is False and c.kv_dtype is None
    assert (c.overlap, c.cascade, c.torch_compile, c.warmup) == (None, True, False, False)


BAD = [
    (dict(num_blocks=0), ValueError, r"num_blocks must be >= 1 \(or None to size it\), got 0"),
    (dict(num_blocks="8"), TypeError, r"num_blocks must be an int >= 1 .* got str '8'"),
    (dict(num_blocks=8.0), TypeError, "num_blocks must be an int"),
    (dict(gpu_memory_fraction=0), ValueError, r"gpu_memory_fraction must be in \(0, 1\], got 0"),
    (dict(gpu_memory_fraction=1.5), ValueError, r"in \(0, 1\], got 1.5"),
    (dict(gpu_memory_fraction="0.5"), TypeError, "gpu_memory_fraction must be a number"),
    (dict(block_size=0), ValueError, "block_size must be >= 1, got 0"),
    (dict(block_size=True), TypeError, "block_size must be an int >= 1, got bool True"),
    (dict(max_batch_tokens=-5), ValueError, "max_batch_tokens must be >= 1, got -5"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs must be >= 1"),
    (dict(cpu_kv_bytes=0), ValueError, "cpu_kv_bytes must be >= 1"),
    (dict(repeat_cache_bytes=-1), ValueError, "repeat_cache_bytes must be >= 0, got -1"),
    (dict(repeat_cache_bytes=1.5), TypeError, "repeat_cache_bytes must be an int >= 0"),
    (dict(prefix_caching=1), TypeError, "prefix_caching must be True or False, got int 1"),
    (dict(cuda_graphs="no"), TypeError, "cuda_graphs must be True or False"),
    (dict(overlap="yes"), TypeError, "overlap must be True or False, got str 'yes'"),
    (dict(torch_compile=1), TypeError, "torch_compile must be True or False"),
    (dict(preemption="swapp"), ValueError, "preemption must be 'recompute' or 'swap', got 'swapp'"),
    (dict(preemption=None), TypeError, "preemption must be 'recompute' or 'swap', got NoneType"),
    (dict(preemption_policy="newset"), ValueError, "'newset' is not a known policy"),
    (dict(preemption_policy=3), TypeError, "preemption_policy must be a policy name"),
]


@pytest.mark.parametrize(("options", "exc", "match"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_options_raise_naming_the_option(model, options, exc, match):
    with pytest.raises(exc, match=match):
        EngineConfig(**options)
    impl = model.config._attn_implementation
    with pytest.raises(exc, match=match):  # the same check, the same message, from Engine
        Engine(model, **options)
    assert model.config._attn_implementation == impl


def test_numbers_are_normalised():
    c = EngineConfig(num_blocks=np.int64(8), block_size=np.int32(4), gpu_memory_fraction=1)
    assert type(c.num_blocks) is int and type(c.block_size) is int and c.num_blocks == 8
    assert type(c.gpu_memory_fraction) is float


def test_keyword_options_and_a_config_build_the_same_engine(model):
    by_keyword = Engine(model, num_blocks=12, block_size=4, max_batch_tokens=32)
    cfg = EngineConfig(num_blocks=12, block_size=4, max_batch_tokens=32)
    by_config = Engine(model, config=cfg)
    assert by_keyword.config == by_config.config == cfg
    assert by_config.config is cfg  # a config given without overrides is used as it is
    assert by_config.cache.num_blocks == 12 and by_config.cache.block_size == 4
    assert by_config.scheduler.max_batch_tokens == 32
    p = SamplingParams(max_new_tokens=5, ignore_eos=True)
    prompts = [list(range(3, 20)), list(range(40, 50))]
    assert [o.token_ids for o in by_keyword.generate(prompts, p)] == [
        o.token_ids for o in by_config.generate(prompts, p)
    ]


def test_overrides_apply_on_top_of_a_config(model):
    base = EngineConfig(num_blocks=12, block_size=4, preemption_policy="lru")
    engine = Engine(model, None, base, block_size=8, max_num_seqs=3)
    assert engine.config == dataclasses.replace(base, block_size=8, max_num_seqs=3)
    assert base.block_size == 4  # the given config is not changed
    assert engine.cache.block_size == 8 and engine.scheduler.max_num_seqs == 3
    assert engine.scheduler.policy.name == "lru"
    # another engine like this one (what Engine.with_config was for)
    other = Engine(model, None, engine.config, num_blocks=16)
    assert other.config == dataclasses.replace(engine.config, num_blocks=16)


def test_unknown_options_and_a_positional_option_are_type_errors(model):
    impl = model.config._attn_implementation
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) \['blocks'\]") as info:
        Engine(model, blocks=8)
    assert "'num_blocks'" in str(info.value) and "'cpu_kv_bytes'" in str(info.value)
    assert "tiers" in str(info.value)  # the keywords that are not options are named too
    with pytest.raises(TypeError, match="config must be an EngineConfig .* got int 64"):
        Engine(model, None, 64)  # num_blocks passed positionally (0.1.0 allowed it)
    with pytest.raises(TypeError, match="config must be an EngineConfig"):
        Engine(model, None, {"num_blocks": 8})
    with pytest.raises(TypeError, match="unknown engine option"):
        Engine(model, config=EngineConfig(), policy="lru")  # derived, not an option
    with pytest.raises(TypeError, match="second argument of Engine is the tokenizer"):
        Engine(model, EngineConfig(num_blocks=8))
    assert model.config._attn_implementation == impl


def test_the_preemption_policy_is_checked_once_and_shared(model, monkeypatch):
    calls = []
    real = config_module.make_preemption_policy
    monkeypatch.setattr(
        config_module, "make_preemption_policy", lambda spec: calls.append(spec) or real(spec)
    )
    engine = Engine(model, num_blocks=8, preemption_policy="oldest")
    assert calls == ["oldest"]  # the config's check; the scheduler takes the result
    assert engine.scheduler.policy is engine.config.policy
    assert engine.scheduler.preemption == "recompute"


def test_swap_without_tiers_is_refused(model):
    with pytest.raises(ValueError, match=r"preemption='swap' needs tiers="):
        Engine(model, num_blocks=8, preemption="swap")


def test_cpu_kv_bytes_sizes_the_pool_on_cpu(model):
    probe = Engine(model, num_blocks=2, block_size=8)
    per_block = probe.cache.layout.bytes_per_block
    engine = Engine(model, block_size=8, cpu_kv_bytes=10 * per_block + 1)
    assert engine.cache.num_blocks == 10
    with pytest.raises(ValueError, match="only .* bytes available"):
        Engine(model, block_size=8, cpu_kv_bytes=per_block)


def test_from_pretrained_checks_its_options_before_loading(monkeypatch):
    from pagedkv.engine import model_loader

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded despite a bad option")

    monkeypatch.setattr(model_loader, "load_model", must_not_load)
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        Engine.from_pretrained(device="cpu", max_batch_tokens=0)
    with pytest.raises(TypeError, match="unknown engine option"):
        Engine.from_pretrained(device="cpu", max_tokens=8)
    with pytest.raises(TypeError, match="config must be an EngineConfig"):
        Engine.from_pretrained(device="cpu", config=8)


def test_from_pretrained_passes_config_and_overrides(model, monkeypatch):
    from pagedkv.engine import model_loader

    monkeypatch.setattr(model_loader, "load_model", lambda path, device, dtype: (model, None))
    engine = Engine.from_pretrained(
        config=EngineConfig(num_blocks=9, block_size=4), block_size=8, model_version="rev-1"
    )
    assert engine.config == EngineConfig(num_blocks=9, block_size=8)
    assert engine.cache.num_blocks == 9 and engine.cache.block_size == 8
