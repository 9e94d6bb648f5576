"""Miss explanations: one test per status, a prompt with a gap in the middle, what a request
would get (it matches allocate), the ghost list's bounds, and salt isolation."""

from __future__ import annotations

import pytest
import torch

from pagedkv import BlockManager, KVCache, KVLayout
from pagedkv.explain import PrefixReport, explain_prefix, explain_report, format_report
from pagedkv.tiers import CPUTier, DiskTier

BS = 4
A, B, C = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
P = A + B + C + [13]  # 3 full blocks and a partial one
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=BS, dtype=torch.float32)
BPB = LAYOUT.bytes_per_block
OTHER = list(range(100, 116))  # 4 full blocks of other tokens: evicts a small pool


def report(cache: KVCache, tokens: list[int], salt: object = None) -> PrefixReport:
    r = cache.explain(tokens, salt)
    cache.check_integrity()
    return r


def test_device_and_never_seen():
    cache = KVCache(LAYOUT, 8)
    cache.allocate("a", A + B + [1])
    cache.free("a")
    r = report(cache, P)
    assert r.blocks == ("device", "device", "never_seen")
    assert (r.device_tokens, r.tier_tokens, r.first_miss) == (8, {}, 2)
    assert (r.cached_tokens, r.computed_tokens, r.num_tokens) == (8, 5, 13)
    assert cache.allocate("p", P) == r.cached_tokens  # explain says what allocate does
    r = report(cache, P)  # now all three are registered; the last token is always computed
    assert r.blocks == ("device",) * 3 and r.first_miss is None and r.device_tokens == 12
    assert report(cache, [7, 7]).blocks == ()  # no full block: nothing to say


def test_evicted():
    cache = KVCache(LAYOUT, 4)
    cache.allocate("a", P)
    cache.free("a")
    cache.allocate("b", OTHER)  # the 4-block pool evicts all of a's blocks
    r = report(cache, P)
    assert r.blocks == ("evicted",) * 3 and r.first_miss == 0 and r.cached_tokens == 0


def test_expired_before_and_after_it_is_dropped():
    now = [0.0]
    m = BlockManager(8, BS, ttl_seconds=10, clock=lambda: now[0])
    m.allocate("a", A + B + [1])
    m.free("a")
    now[0] = 11.0  # idle past the TTL: still registered, but no prompt would use it
    r = explain_prefix(m, A + B + [1])
    assert r.blocks == ("expired", "expired") and r.device_tokens == 0 and r.first_miss == 0
    m.allocate("c", C + [2])  # handing out blocks drops the expired ones
    assert m.stats().cached_blocks == 0  # A and B are gone (C is in use)
    assert explain_prefix(m, A + B + [1]).blocks == ("expired", "expired")  # the ghost list
    m.check_integrity()


def test_tier_cpu_and_what_a_request_would_load():
    cache = KVCache(LAYOUT, 4, tiers=[CPUTier(16 * BPB)])
    cache.allocate("a", P)
    cache.free("a")
    cache.allocate("b", OTHER)  # a's blocks are demoted to the CPU tier
    r = report(cache, P)
    assert r.blocks == ("tier:cpu",) * 3
    assert (r.device_tokens, r.tier_tokens, r.first_miss) == (0, {"cpu": 12}, None)
    cache.free("b")
    assert cache.allocate("p", P) == r.cached_tokens == 12
    cache.close()


def test_middle_block_evicted_tail_in_the_disk_tier(tmp_path):
    # The CPU tier holds one block, so demotions spill to disk; B is then lost from the
    # tiers; a short prompt brings A back to the device.
    cache = KVCache(LAYOUT, 4, tiers=[CPUTier(BPB), DiskTier(tmp_path, 64 * (BPB + 256))])
    cache.allocate("a", P)
    cache.free("a")
    cache.allocate("b", OTHER)
    cache.free("b")
    assert report(cache, P).blocks == ("tier:cpu", "tier:disk", "tier:disk")
    key_b = cache.tiers.key(cache.manager.hash_blocks(A + B)[1])
    for level in cache.tiers.levels:
        level.delete([key_b])
    assert cache.allocate("a2", A + [0]) == 4  # A is loaded from the CPU tier
    cache.free("a2")
    r = report(cache, P)
    assert r.blocks == ("device", "evicted", "tier:disk")
    assert r.first_miss == 1 and r.device_tokens == 4
    assert r.tier_tokens == {"cpu": 0, "disk": 0}  # a request loads a leading run only
    assert cache.allocate("p", P) == r.cached_tokens == 4
    cache.close()


def test_a_salt_learns_nothing_of_another_salts_blocks():
    cache = KVCache(LAYOUT, 6, tiers=[CPUTier(16 * BPB)])
    cache.allocate("b", P, salt="tenant-b")
    cache.free("b")
    cache.allocate("b2", A + B + [1], salt="tenant-b")  # on the device, in use
    cache.allocate("o", [50] * 9, salt="tenant-b")  # evicts C to the tier and the ghosts
    mine = report(cache, P, salt="tenant-b")
    assert mine.blocks == ("device", "device", "tier:cpu")
    for salt in ("tenant-a", None):  # the same tokens in other namespaces: nothing known
        r = report(cache, P, salt=salt)
        assert r.blocks == ("never_seen",) * 3 and r.cached_tokens == 0 and r.first_miss == 0
    cache.close()


def test_ghost_list_is_bounded_and_can_be_off():
    digest = 32 + 33 + 8  # a SHA-256 hash, its bytes object's header and a list slot
    m = BlockManager(2, BS, ghost_bytes=3 * digest)
    for i in range(6):  # 6 single-block prompts through a 2-block pool
        m.allocate(i, [i] * BS + [99])
        m.free(i)
    seen = [explain_prefix(m, [i] * BS + [99]).blocks[0] for i in range(6)]
    # the last 3 evicted are remembered; the newest are still on the device
    assert seen == ["never_seen", "never_seen", "evicted", "evicted", "evicted", "device"]
    assert len(m._alloc.ghosts) == 3
    m.check_integrity()
    off = BlockManager(2, BS, ghost_bytes=0)
    off.allocate("a", A + [1])
    off.free("a")
    off.allocate("b", B + [1])
    assert explain_prefix(off, A + [1]).blocks == ("never_seen",)
    with pytest.raises(ValueError, match="ghost_bytes"):
        BlockManager(2, BS, ghost_bytes=-1)


def test_explain_validates_and_changes_nothing():
    cache = KVCache(LAYOUT, 4)
    cache.allocate("a", P)
    before = cache.stats()
    with pytest.raises(TypeError, match="token_ids"):
        cache.explain("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="salt"):
        cache.explain(P, salt=1.5)
    with cache.paused():  # a read: allowed while a snapshot reads the cache
        cache.explain(P)
    assert cache.stats() == before


def test_report_text():
    cache = KVCache(LAYOUT, 8)
    cache.allocate("a", A + [1])
    text = explain_report(cache, P)
    assert text == str(cache.explain(P)) == format_report(cache.explain(P))
    assert text.splitlines() == [
        "prompt: 13 tokens, 3 full blocks of 4 tokens",
        "  blocks 0: device",
        "  blocks 1-2: never_seen   <- first miss: block 1",
        "a request gets 4 cached tokens (4 from the device) and computes 9",
    ]
