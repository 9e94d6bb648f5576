"""KV events: exact sequences per operation on small pools, subscribers that misbehave,
batches, events from other threads, and the JSON-lines writer."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from pagedkv import BlockManager, KVCache, KVLayout
from pagedkv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    JsonlWriter,
    event_dict,
    read_jsonl,
)
from pagedkv.tiers import CPUTier

BS = 4
A, B, C = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=BS, dtype=torch.float32)


def stored(m: BlockManager, tokens: list[int], first: int, salt: object = None) -> BlockStored:
    """The BlockStored of blocks ``first..`` of ``tokens`` (their full blocks)."""
    hashes = m.hash_blocks(tokens, salt)
    return BlockStored(
        block_hashes=hashes[first:],
        parent_block_hash=hashes[first - 1] if first else None,
        token_ids=tokens[first * BS : len(hashes) * BS],
        block_size=BS,
        medium="device",
    )


def subscribed(m: BlockManager) -> list[list]:
    batches: list[list] = []
    m.subscribe(batches.append)
    return batches


def test_allocate_append_free_evict_reset_exact_sequence():
    m = BlockManager(4, BS)
    batches = subscribed(m)
    a = A + B + [13, 14]
    assert m.allocate("a", a) == 0
    assert batches == [[stored(m, a[:8], 0)]]
    m.append("a", [15, 16])  # block 2 fills: stored, chained to block 1
    assert batches[-1] == [stored(m, a + [15, 16], 2)]
    m.append("a", [17])  # a fresh block from the free stack: no event, no batch
    m.fork("a", "a2")  # sharing registers nothing
    m.free("a2")
    m.free("a")  # full blocks stay cached, the partial one is free: nothing changes
    assert len(batches) == 2
    # b needs 3 blocks: the free one, then the LRU evicts a's tail first (blocks 2, 1).
    b = [100 + i for i in range(9)]
    m.allocate("b", b)
    a_hashes = m.hash_blocks(a + [15, 16])
    assert batches[-1] == [BlockRemoved([a_hashes[2], a_hashes[1]]), stored(m, b[:8], 0)]
    assert m.reset_prefix_cache() is False and len(batches) == 3  # b is in use: refused
    m.free("b")
    assert m.reset_prefix_cache() is True
    assert batches[-1] == [AllBlocksCleared("device")]
    assert len(batches) == 4
    m.check_integrity()


def test_a_skipped_block_splits_the_stored_runs_and_names_its_parent():
    # FIFO evicts a parent (A) while its child (B) stays registered; a prompt A+B+C then
    # registers A, skips B (its content has a block) and registers C under parent B.
    m = BlockManager(12, BS, eviction="fifo")
    y = list(range(200, 225))  # 6 full blocks + 1 partial, registered first (oldest)
    m.allocate("y", y)
    m.allocate("g", A + B + [50])
    m.free("g")  # A, B cached
    batches = subscribed(m)
    m.allocate("z", list(range(300, 316)))  # 3 free blocks + 1 evicted: A (FIFO)
    h_ab = m.hash_blocks(A + B)
    assert batches[-1][0] == BlockRemoved([h_ab[0]])
    m.free("y")  # its full blocks are cached, registered before B
    f = A + B + C + [60]
    assert m.allocate("f", f) == 0  # A is gone, so nothing is a prefix hit
    h_y = m.hash_blocks(y)
    assert (
        batches[-1]
        == [
            BlockRemoved(h_y[:3]),  # FIFO: the oldest registrations go first, B survives
            stored(m, A, 0),
            stored(m, f[:12], 2),  # C, chained to B's hash (held by g's old block)
        ]
    )
    m.check_integrity()


def test_append_skips_content_cached_elsewhere_and_chains_from_it():
    m = BlockManager(8, BS)
    batches = subscribed(m)
    m.allocate("q", A[:3])
    m.allocate("p", A + B + [20])
    assert batches[-1] == [stored(m, A + B, 0)]
    m.append("q", [A[3]] + B + C)  # A and B are p's already: only C is stored
    assert batches[-1] == [stored(m, A + B + C, 2)]
    m.check_integrity()


def test_discard_and_expiry_remove_blocks():
    now = [0.0]
    m = BlockManager(4, BS, ttl_seconds=10, clock=lambda: now[0])
    batches = subscribed(m)
    m.allocate("x", A + B + [1])
    h = m.hash_blocks(A + B)
    m.discard("x")  # its KV never arrived: the blocks it registered are removed
    assert batches[-1] == [BlockRemoved(h)]
    m.allocate("y", A + [2])
    m.free("y")
    now[0] = 11.0  # A idles past the TTL: dropped before blocks are handed out
    m.allocate("z", C + [3])
    assert batches[-1] == [BlockRemoved([h[0]]), stored(m, C, 0)]
    m.allocate("w", B + [4])
    m.free("w")
    now[0] = 30.0
    m.pin(B)  # pinning drops expired blocks first
    assert batches[-1] == [BlockRemoved(m.hash_blocks(B))]
    m.check_integrity()


def test_events_carry_salted_hashes():
    m = BlockManager(8, BS)
    batches = subscribed(m)
    m.allocate("t1", A + [0], salt="tenant-1")
    m.allocate("t2", A + [0], salt="tenant-2")
    one, two = batches[0][0], batches[1][0]
    assert one.token_ids == two.token_ids == A  # an operator feed: tokens of every tenant
    assert one.block_hashes == m.hash_blocks(A, "tenant-1") != two.block_hashes


def test_prefix_caching_off_stores_nothing():
    m = BlockManager(4, BS, prefix_caching=False)
    batches = subscribed(m)
    m.allocate("a", A + B + C + [1])
    m.free("a")
    m.allocate("b", A + B + C + [1])
    assert batches == []


def test_a_subscriber_that_raises_is_logged_and_dropped(caplog):
    m = BlockManager(8, BS)
    good: list[list] = []
    calls = []

    def bad(events):
        calls.append(events)
        raise RuntimeError("consumer bug")

    m.subscribe(bad)
    m.subscribe(good.append)
    with caplog.at_level(logging.ERROR, logger="pagedkv.events"):
        assert m.allocate("a", A + B + [1]) == 0  # the operation completes
    assert "unsubscribed" in caplog.text and "consumer bug" in caplog.text
    assert m.subscribers == 1 and len(calls) == 1 and len(good) == 1
    m.allocate("b", C + [1])
    assert len(calls) == 1 and len(good) == 2  # never called again
    assert m.lookup(A + B + [9]) == 8
    m.check_integrity()


def test_each_subscriber_gets_its_own_list():
    m = BlockManager(8, BS)
    first: list[list] = []
    m.subscribe(lambda events: (first.append(list(events)), events.clear()))
    second = subscribed(m)
    m.allocate("a", A + [1])
    assert first == second and len(second[0]) == 1


def test_unsubscribe_is_idempotent_and_the_last_one_leaves_no_hub():
    m = BlockManager(8, BS)
    batches: list[list] = []
    unsubscribe = m.subscribe(batches.append)
    other = m.subscribe(lambda events: None)
    assert m.subscribers == 2
    unsubscribe()
    unsubscribe()
    assert m.subscribers == 1
    other()
    assert m.subscribers == 0 and m._events is None and m._alloc.events is None
    m.allocate("a", A + [1])
    assert batches == []
    with pytest.raises(TypeError, match="callback"):
        m.subscribe("not callable")  # type: ignore[arg-type]


def test_event_batch_delivers_once_at_the_end():
    m = BlockManager(8, BS)
    batches = subscribed(m)
    with m.event_batch():
        m.allocate("a", A + [1])
        m.allocate("b", B + [1])
        with m.event_batch():  # nested: still one batch
            m.allocate("c", C + [1])
        assert batches == []
    assert batches == [[stored(m, A, 0), stored(m, B, 0), stored(m, C, 0)]]
    with m.event_batch():  # nothing happened: no batch
        m.free("a")
    assert len(batches) == 1


def test_events_of_another_thread_go_out_with_the_next_batch():
    m = BlockManager(8, BS)
    batches = subscribed(m)
    tier_event = BlockStored([b"\x01" * 32], None, [], BS, medium="cpu")
    t = threading.Thread(target=m.publish_events, args=([tier_event],))
    t.start()
    t.join()
    assert batches == []  # delivered on the cache's thread, not the publisher's
    m.allocate("a", A + [1])
    assert batches == [[stored(m, A, 0), tier_event]]
    m.publish_events([BlockRemoved([b"\x01" * 32], medium="cpu")])
    m.deliver_events()
    assert batches[-1] == [BlockRemoved([b"\x01" * 32], medium="cpu")]


def test_kvcache_allocate_is_one_batch_even_when_its_tier_load_fails(monkeypatch):
    cache = KVCache(LAYOUT, 8, tiers=[CPUTier(4 * LAYOUT.bytes_per_block)])
    batches: list[list] = []
    cache.subscribe(batches.append)

    def broken(*args):
        raise OSError("tier read failed")

    monkeypatch.setattr(cache.tiers, "promote", broken)
    with pytest.raises(OSError, match="tier read failed"):
        cache.allocate("a", A + B + [1])
    h = cache.manager.hash_blocks(A + B)
    assert batches == [[stored(cache.manager, A + B, 0), BlockRemoved(h)]]
    cache.check_integrity()
    cache.close()


def test_kvcache_events_through_a_workload():
    cache = KVCache(LAYOUT, 3)
    batches: list[list] = []
    unsubscribe = cache.subscribe(batches.append)
    cache.allocate("a", A + B + [1])
    cache.free("a")
    cache.allocate("b", C + [2])  # the free block and one eviction (a's tail, B)
    m = cache.manager
    assert batches == [
        [stored(m, A + B, 0)],
        [BlockRemoved([m.hash_blocks(A + B)[1]]), stored(m, C, 0)],
    ]
    unsubscribe()
    cache.free("b")
    assert cache.manager.subscribers == 0


def test_jsonl_writer_one_line_per_batch_hashes_hex(tmp_path):
    m = BlockManager(4, BS)
    path = tmp_path / "events.jsonl"
    with JsonlWriter(path) as writer:
        m.subscribe(writer)
        m.allocate("a", A + B + [1])
        m.free("a")
        m.allocate("b", C + [9, 9, 9, 9, 1])  # evicts B, A's tail
        m.free("b")
        m.reset_prefix_cache()
    lines = read_jsonl(path)
    assert [[e["type"] for e in line["events"]] for line in lines] == [
        ["BlockStored"], ["BlockRemoved", "BlockStored"], ["AllBlocksCleared"],
    ]  # fmt: skip
    first = lines[0]["events"][0]
    assert first == {
        "type": "BlockStored",
        "block_hashes": [h.hex() for h in m.hash_blocks(A + B)],
        "parent_block_hash": None,
        "token_ids": A + B,
        "block_size": BS,
        "lora_id": None,
        "medium": "device",
    }
    assert lines[1]["events"][0] == {
        "type": "BlockRemoved", "block_hashes": [m.hash_blocks(A + B)[1].hex()], "medium": "device",
    }  # fmt: skip
    assert all(isinstance(line["ts"], float) for line in lines)
    assert event_dict(AllBlocksCleared("cpu")) == {"type": "AllBlocksCleared", "medium": "cpu"}
    with pytest.raises(TypeError, match="KV event"):
        event_dict("nope")  # type: ignore[arg-type]


def test_jsonl_writer_never_overwrites_and_a_closed_one_is_dropped(tmp_path, caplog):
    path = tmp_path / "mine.txt"
    path.write_text("not pagedkv's\n")
    with pytest.raises(FileExistsError, match="append=True"):
        JsonlWriter(path)
    assert path.read_text() == "not pagedkv's\n"
    out = tmp_path / "events.jsonl"
    JsonlWriter(out).close()
    writer = JsonlWriter(out, append=True)  # adds to it
    m = BlockManager(4, BS)
    m.subscribe(writer)
    m.allocate("a", A + [1])
    writer.close()
    writer.close()  # idempotent
    with caplog.at_level(logging.ERROR, logger="pagedkv.events"):
        m.allocate("b", B + [1])
    assert "closed" in caplog.text and m.subscribers == 0
    assert len(read_jsonl(out)) == 1 and writer.batches == 1
    with pytest.raises(TypeError, match="path"):
        JsonlWriter(3)  # type: ignore[arg-type]
