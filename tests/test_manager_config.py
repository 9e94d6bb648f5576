"""ManagerConfig is the one source of the manager's options, for BlockManager and KVCache."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from pagedkv import BlockManager, CachePausedError, KVCache, KVLayout, PagedKVError
from pagedkv.manager import ManagerConfig

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32)
OPTIONS = [f.name for f in dataclasses.fields(ManagerConfig)]
CUSTOM = ManagerConfig(
    prefix_caching=True, eviction="FIFO", ttl_seconds=30, extra_keys=["m", 2],
    hash_algo="xxh3_128", watermarks=[0.5, 0.7, 0.9],
)  # fmt: skip


def test_block_manager_keywords_are_the_config_fields_with_its_defaults():
    params = inspect.signature(BlockManager).parameters
    defaults = ManagerConfig()
    for name in OPTIONS:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == getattr(defaults, name), name
    extra = set(params) - set(OPTIONS)
    assert extra == {"num_blocks", "block_size", "on_evict", "clock"}


def test_kvcache_keywords_override_the_config_fields():
    params = inspect.signature(KVCache).parameters
    for name in ("prefix_caching", "eviction", "ttl_seconds", "hash_algo", "watermarks"):
        assert name in OPTIONS and params[name].default is None
    assert params["manager"].default is None


def test_config_normalises_once():
    assert CUSTOM.eviction == "fifo" and CUSTOM.ttl_seconds == 30.0
    assert CUSTOM.extra_keys == ("m", 2) and CUSTOM.watermarks == (0.5, 0.7, 0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CUSTOM.eviction = "lru"  # type: ignore[misc]


def test_from_config_builds_the_same_manager_as_the_keywords():
    a = BlockManager.from_config(16, 4, CUSTOM)
    b = BlockManager(16, 4, **{name: getattr(CUSTOM, name) for name in OPTIONS})
    assert a.config == b.config == CUSTOM
    assert (a.eviction, a.ttl_seconds, a.hash_algo, a.watermarks) == (
        "fifo", 30.0, "xxh3_128", (0.5, 0.7, 0.9),
    )  # fmt: skip
    assert a.hash_blocks([1, 2, 3, 4]) == b.hash_blocks([1, 2, 3, 4])
    with pytest.raises(TypeError, match="ManagerConfig"):
        BlockManager.from_config(16, 4, {"eviction": "lru"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager.from_config(0, 4, CUSTOM)


@pytest.mark.parametrize(
    "field, value, exc",
    [
        ("prefix_caching", 1, TypeError),
        ("prefix_caching", None, TypeError),
        ("eviction", "mru", ValueError),
        ("eviction", 3, TypeError),
        ("ttl_seconds", 0, ValueError),
        ("ttl_seconds", float("nan"), ValueError),
        ("ttl_seconds", "5", TypeError),
        ("ttl_seconds", True, TypeError),
        ("extra_keys", "model", TypeError),
        ("extra_keys", [1.5], TypeError),
        ("hash_algo", "md5", ValueError),
        ("hash_algo", b"sha256", TypeError),
        ("watermarks", (0.9, 0.8, 0.95), ValueError),
        ("watermarks", (0.5, True, 0.9), ValueError),
    ],
)
def test_config_rejects_naming_the_field(field, value, exc):
    with pytest.raises(exc, match=field):
        ManagerConfig(**{field: value})
    with pytest.raises(exc, match=field):
        BlockManager(8, 4, **{field: value})


def test_override_replaces_only_what_is_given():
    assert CUSTOM.override() == CUSTOM
    changed = CUSTOM.override(eviction="lru", ttl_seconds=5)
    assert (changed.eviction, changed.ttl_seconds, changed.hash_algo) == ("lru", 5.0, "xxh3_128")
    assert changed.extra_keys == CUSTOM.extra_keys
    with pytest.raises(ValueError, match="eviction"):
        CUSTOM.override(eviction="random")


def test_kvcache_takes_a_config_and_keyword_overrides():
    base = ManagerConfig(eviction="lfu", hash_algo="xxh3_128", prefix_caching=False)
    cache = KVCache(LAYOUT, 8, manager=base, prefix_caching=True, ttl_seconds=60)
    cfg = cache.manager.config
    assert (cfg.eviction, cfg.hash_algo, cfg.prefix_caching, cfg.ttl_seconds) == (
        "lfu", "xxh3_128", True, 60.0,
    )  # fmt: skip
    assert cfg.extra_keys == (cache.fingerprint,)  # the cache folds the model in itself
    plain = KVCache(LAYOUT, 8, eviction="fifo")
    assert plain.manager.config == ManagerConfig(eviction="fifo", extra_keys=(plain.fingerprint,))


def test_kvcache_refuses_bad_manager_options_before_building_anything():
    with pytest.raises(TypeError, match="ManagerConfig"):
        KVCache(LAYOUT, 8, manager={"eviction": "lru"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_fingerprint"):
        KVCache(LAYOUT, 8, manager=ManagerConfig(extra_keys=("adapter",)))
    with pytest.raises(ValueError, match="watermarks"):
        KVCache(LAYOUT, 8, watermarks=(0.9, 0.1, 0.5))
    with pytest.raises(TypeError, match="write_through"):
        KVCache(LAYOUT, 8, write_through="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="extra_keys"):
        KVCache(LAYOUT, 8, extra_keys=("x",))  # type: ignore[call-arg]


def test_kvcache_lookup_is_the_device_hit_and_changes_nothing():
    cache = KVCache(LAYOUT, 8)
    prompt = list(range(1, 14))
    assert cache.lookup(prompt) == 0
    cache.allocate("a", prompt, salt="t")
    cache.free("a")
    before = (cache.stats(), cache.manager.eviction_order())
    with cache.paused():  # a read: allowed while a snapshot reads the cache
        assert cache.lookup(prompt, salt="t") == 12 == cache.manager.lookup(prompt, "t")
        assert cache.lookup(prompt) == 0  # another salt
    assert (cache.stats(), cache.manager.eviction_order()) == before
    with pytest.raises(TypeError, match="salt"):
        cache.lookup(prompt, salt=1.5)


def test_paused_cache_raises_one_error_type_everywhere():
    cache = KVCache(LAYOUT, 8)
    cache.allocate("a", [1, 2, 3, 4, 5])
    calls = [
        lambda: cache.allocate("b", [1]),
        lambda: cache.append("a", [6]),
        lambda: cache.fork("a", "c"),
        lambda: cache.free("a"),
        lambda: cache.discard("a"),
        lambda: cache.swap_out("a"),
        lambda: cache.swap_in("a"),
    ]
    with cache.paused():
        for call in calls:
            with pytest.raises(CachePausedError, match="paused") as info:
                call()
            assert isinstance(info.value, PagedKVError) and isinstance(info.value, RuntimeError)
    assert cache.seq_ids() == ["a"] and cache.num_tokens("a") == 5
    cache.check_integrity()
