"""KV events of the tiers: exact sequences for demote / spill / promote / reset on a
small pool over CPU + disk tiers, a Redis tier, corrupt entries, and the sink going
away with the last subscriber."""

from __future__ import annotations

import logging

import torch

from pagedkv import KVCache, KVLayout
from pagedkv.events import AllBlocksCleared, BlockRemoved, BlockStored
from pagedkv.tiers import CPUTier, DiskTier, RedisTier

BS = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=BS, dtype=torch.float32)
BPB = LAYOUT.bytes_per_block
A, B, C, D, E, F = ([i, i + 1, i + 2, i + 3] for i in range(1, 25, 4))


class Recorder:
    """Batches of events, each event shown as (kind, medium, block names)."""

    def __init__(self, cache: KVCache) -> None:
        self.cache, self.names, self.batches = cache, {}, []
        cache.subscribe(self.batches.append)

    def name(self, tokens: list[int], names: str) -> None:
        for h, n in zip(self.cache.manager.hash_blocks(tokens), names, strict=True):
            self.names[h] = n

    def take(self) -> list[tuple]:
        """The events since the last call, once the tiers' writes landed, in order. (How
        they are cut into batches depends on when the writer thread stores: with a batch
        of the operation if it stored before the operation ended, else the next.)"""
        self.cache.flush()
        out = [self._show(e) for batch in self.batches for e in batch]
        self.batches.clear()
        return out

    def _show(self, e) -> tuple:
        if isinstance(e, AllBlocksCleared):
            return ("cleared", e.medium)
        names = [self.names[h] for h in e.block_hashes]
        # a tier's order is its LRU's, which a promote's reads and the writer thread's
        # victims race for: only the set is certain
        names = "".join(sorted(names) if e.medium != "device" else names)
        if isinstance(e, BlockStored):
            tier = e.medium != "device"
            assert e.block_size == BS and (e.parent_block_hash is None or not tier)
            assert len(e.token_ids) == (0 if tier else BS * len(e.block_hashes))
            return ("stored", e.medium, names)
        assert isinstance(e, BlockRemoved)
        return ("removed", e.medium, names)


def fill(cache: KVCache, seq_id) -> None:
    slots = torch.tensor(cache.slot_mapping(seq_id), dtype=torch.long)
    kv = torch.full((len(slots), 1, 4), float(len(slots)))
    cache.write(0, slots, kv, kv)


def run(cache: KVCache, seq_id, tokens: list[int]) -> None:
    cache.allocate(seq_id, tokens)
    fill(cache, seq_id)
    cache.free(seq_id)


def test_demote_spill_promote_and_reset_on_cpu_and_disk(tmp_path):
    # 4 device blocks, a CPU tier of 2 blocks spilling to a disk tier of 8
    cache = KVCache(LAYOUT, 4, tiers=[CPUTier(2 * BPB), DiskTier(tmp_path / "kv", 8 * BPB)])
    rec = Recorder(cache)
    for tokens, names in ((A + B, "AB"), (C + D, "CD"), (E + F, "EF")):
        rec.name(tokens, names)
    run(cache, "a", A + B + [1])  # 3 blocks: A, B cached after the free
    assert rec.take() == [("stored", "device", "AB")]
    run(cache, "b", C + D + [1])  # the 2 free blocks and one eviction: B (the chain's tail)
    assert rec.take() == [
        ("removed", "device", "B"), ("stored", "device", "CD"),
        ("stored", "cpu", "B"),  # demoted: lands on the writer thread, then delivered
    ]  # fmt: skip
    run(cache, "c", E + F + [1])  # evicts A, D: the full CPU tier spills B to disk
    assert rec.take() == [
        ("removed", "device", "AD"), ("stored", "device", "EF"),
        ("stored", "disk", "B"), ("removed", "cpu", "B"), ("stored", "cpu", "AD"),
    ]  # fmt: skip
    # promote: A from the CPU tier, B from disk, into blocks freed by evicting C, F
    assert cache.allocate("d", A + B + [2]) == 8
    assert rec.take() == [
        ("removed", "device", "CF"), ("stored", "device", "AB"),
        ("stored", "disk", "AD"), ("removed", "cpu", "AD"), ("stored", "cpu", "CF"),
    ]  # fmt: skip
    cache.free("d")
    assert cache.manager.reset_prefix_cache()
    assert rec.take() == [("cleared", "device")]  # the tiers keep their entries
    assert cache.explain(A + B + [3]).blocks == ("tier:disk", "tier:disk")
    cache.check_integrity()
    cache.close()


def test_a_redis_tier_reports_its_puts(redis_url):
    cache = KVCache(LAYOUT, 3, tiers=[RedisTier(redis_url, timeout_s=0.5)])
    rec = Recorder(cache)
    rec.name(A + B, "AB")
    rec.name(C + D, "CD")
    run(cache, "a", A + B + [1])  # 3 blocks: the whole pool
    run(cache, "b", C + D)  # the free block and one eviction: B, into Redis
    assert rec.take() == [
        ("stored", "device", "AB"),
        ("removed", "device", "B"), ("stored", "device", "CD"), ("stored", "redis", "B"),
    ]  # fmt: skip
    assert cache.allocate("c", A + B + [2]) == 8  # A on the device, B back from Redis
    assert rec.take() == [
        ("removed", "device", "DC"),
        ("stored", "device", "B"),
        ("stored", "redis", "CD"),
    ]
    cache.close()


def test_a_corrupt_entry_is_reported_removed(tmp_path):
    cache = KVCache(LAYOUT, 3, tiers=[DiskTier(tmp_path / "kv", 64 * (BPB + 64))])
    rec = Recorder(cache)
    rec.name(A + B, "AB")
    rec.name(C + D, "CD")
    run(cache, "a", A + B + [1])
    run(cache, "b", C + D)
    rec.take()
    h = cache.manager.hash_blocks(A + B)[1]
    path = next(p for p in (tmp_path / "kv").rglob("*.v") if h.hex() in p.name)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    assert cache.allocate("c", A + B + [2]) == 4  # B is bad: the run stops at A
    assert ("removed", "disk", "B") in rec.take() and not path.exists()
    cache.close()


def test_the_tiers_report_only_while_someone_subscribes(caplog):
    cache = KVCache(LAYOUT, 3, tiers=[CPUTier(8 * BPB)])
    level = cache.tiers.levels[0]
    assert level.events is None
    seen: list = []
    first = cache.subscribe(seen.extend)

    def broken(events):
        raise RuntimeError("subscriber bug")

    cache.subscribe(broken)
    assert level.events is not None and level.events.medium == "cpu"
    with caplog.at_level(logging.ERROR, logger="pagedkv.events"):
        run(cache, "a", A + B + [1])
        run(cache, "b", C + D)
        cache.flush()
    assert "subscriber bug" in caplog.text and cache.manager.subscribers == 1
    demoted = cache.manager.hash_blocks(A + B)[1:]  # b took the free block and B's
    assert seen[-1] == BlockStored(demoted, None, [], BS, "cpu")
    first()
    assert level.events is None and cache.manager.subscribers == 0
    run(cache, "c", A + B + [3])  # nobody listens: nothing queued, nothing kept
    cache.flush()
    cache.check_integrity()
    cache.close()


def test_events_of_other_caches_sharing_a_store_are_not_reported():
    cache = KVCache(LAYOUT, 3, tiers=[CPUTier(8 * BPB)])
    level = cache.tiers.levels[0]
    seen: list = []
    cache.subscribe(seen.extend)
    level.events.stored(["kv-0123456789abcdef-00ff", cache.tiers.key(b"\x01\x02")])
    cache.flush()
    assert seen == [BlockStored([b"\x01\x02"], None, [], BS, "cpu")]
    cache.close()
