"""Snapshots of a real KVCache: bit-exact round trip, a conversation resumed elsewhere."""

from __future__ import annotations

import pytest
import torch

from pagedkv.cache import KVCache
from pagedkv.errors import PagedKVError, SnapshotError
from pagedkv.snapshot import CachePager, SnapshotStore
from pagedkv.storage import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.bfloat16)


def write_kv(cache: KVCache, seq_id, start: int, gen: torch.Generator) -> None:
    """Write random K/V for tokens ``start..`` of ``seq_id`` in every layer."""
    slots = torch.tensor(cache.slot_mapping(seq_id, start), dtype=torch.long)
    for layer in range(LAYOUT.num_layers):
        k, v = (torch.randn(len(slots), 2, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
        cache.write(layer, slots, k, v)


def token_kv(cache: KVCache, seq_id) -> torch.Tensor:
    """K/V of the sequence's tokens, gathered by slot: [layers, 2, num_tokens, H, D]."""
    slots = torch.tensor(cache.slot_mapping(seq_id), dtype=torch.long)
    kv = cache.pool.kv  # [L, 2, num_blocks, block_size, H, D]
    return kv.flatten(2, 3)[:, :, slots]


def test_kvcache_is_a_cache_pager():
    assert isinstance(KVCache(LAYOUT, 8, model_fingerprint="m"), CachePager)


def test_kvcache_round_trip_bit_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    src = KVCache(LAYOUT, 64, model_fingerprint="tiny@1")
    src.allocate("a", list(range(13)))
    write_kv(src, "a", 0, gen)
    src.fork("a", "b")
    src.append("b", [900, 901, 902])  # copy-on-write of the shared last block
    write_kv(src, "b", 13, gen)
    src.allocate("c", list(range(12)) + [5, 6], salt="tenant")
    write_kv(src, "c", 0, gen)
    with SnapshotStore(tmp_path) as store:
        info = store.save(src, name="kv")
        assert info.unique_pages == 4 + 1 + 4  # b shares 3 full blocks with a
        dst = KVCache(LAYOUT, 40, model_fingerprint="tiny@1")
        dst.allocate("noise", list(range(500, 530)))
        mapping = store.load(dst, "kv")
        for old, new in mapping.items():
            assert dst.token_ids(new) == src.token_ids(old)
            assert dst.salt(new) == src.salt(old)
            assert torch.equal(token_kv(dst, new), token_kv(src, old))
        dst.check_integrity()
        with pytest.raises(SnapshotError, match="'tiny@1'"):
            store.load(KVCache(LAYOUT, 40, model_fingerprint="tiny@2"), "kv")


def test_resume_one_conversation_in_another_cache(tmp_path):
    """engine.snapshot/resume in miniature: save one sequence, restore, keep decoding."""
    gen = torch.Generator().manual_seed(1)
    src = KVCache(LAYOUT, 32, model_fingerprint="tiny@1")
    src.allocate(17, list(range(10)))
    write_kv(src, 17, 0, gen)
    src.allocate(18, list(range(40, 47)))  # another conversation, not saved
    with SnapshotStore(tmp_path) as store:
        store.save(src, [17], name="conv-17", metadata={"sampling": {"temperature": 0.7}})
        dst = KVCache(LAYOUT, 16, model_fingerprint="tiny@1")
        mapping = store.load(dst, "conv-17", {17: "req-1"})
        assert mapping == {17: "req-1"} and dst.seq_ids() == ["req-1"]
        dst.append("req-1", [77])  # decode continues on the restored sequence
        write_kv(dst, "req-1", 10, gen)
        assert torch.equal(token_kv(dst, "req-1")[:, :, :10], token_kv(src, 17))
        assert store.info("conv-17").metadata["sampling"]["temperature"] == 0.7


def test_save_pauses_the_cache(tmp_path, monkeypatch):
    cache = KVCache(LAYOUT, 16, model_fingerprint="tiny@1")
    cache.allocate("a", list(range(9)))
    real = cache.read_blocks

    def spy(ids):
        with pytest.raises(PagedKVError, match="paused"):
            cache.append("a", [1])
        return real(ids)

    monkeypatch.setattr(cache, "read_blocks", spy)
    with SnapshotStore(tmp_path) as store:
        store.save(cache, name="s")
    cache.append("a", [1])
