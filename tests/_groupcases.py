"""Helpers shared by the KVCacheGroup tests (CPU and GPU): KV that is a function of the
token prefix, and a full picture of a group's state to compare before / after."""

from __future__ import annotations

import torch

from pagedkv import KVCache, KVCacheGroup


def prefix_values(tokens: list[int], salt: object) -> list[int]:
    """One number per position, a hash of the token prefix up to it (and the salt)."""
    h, out = sum(map(ord, repr(salt))) + 17, []
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
        out.append(h % 8191)
    return out


def expected_kv(layout, tokens: list[int], salt: object, layer: int) -> torch.Tensor:
    """K/V of every token as a real model would have it, ``[n, 2, Hkv, D]``: a function of
    the token prefix, so a prefix hit holds exactly the bytes the sequence would write.
    Writers and checkers both round through this function, so any dtype works."""
    values = torch.tensor(prefix_values(tokens, salt), dtype=torch.float32)
    lane = torch.arange(2 * layout.num_kv_heads * layout.head_dim, dtype=torch.float32) % 64
    kv = (values % 256)[:, None] + lane[None, :] / 8 + layer
    return kv.view(len(tokens), 2, layout.num_kv_heads, layout.head_dim).to(layout.dtype)


def write_kv(cache: KVCache, seq_id, start: int, stop: int | None = None) -> None:
    """Write the prefix-determined K/V of tokens ``start..stop`` of ``seq_id``."""
    tokens = cache.token_ids(seq_id)
    stop = len(tokens) if stop is None else stop
    if start >= stop:
        return
    slots = torch.tensor(cache.slot_mapping(seq_id, start, stop), device=cache.device)
    for layer in range(cache.layout.num_layers):
        kv = expected_kv(cache.layout, tokens[:stop], cache.salt(seq_id), layer)[start:]
        kv = kv.to(cache.device)
        cache.write(layer, slots, kv[:, 0].contiguous(), kv[:, 1].contiguous())


def assert_kv(group: KVCacheGroup, seq_id) -> None:
    """The sequence's KV on its member equals the prefix-determined KV of its tokens."""
    cache = group.cache_of(seq_id)
    tokens, salt = cache.token_ids(seq_id), cache.salt(seq_id)
    for layer in range(cache.layout.num_layers):
        k, v = cache.pool.gather(layer, cache.block_table(seq_id), len(tokens))
        want = expected_kv(cache.layout, tokens, salt, layer)
        assert torch.equal(k.cpu(), want[:, 0]) and torch.equal(v.cpu(), want[:, 1]), (
            f"KV of {seq_id!r} on {group.device_of(seq_id)} differs at layer {layer}"
        )


def member_state(cache: KVCache) -> dict:
    """Everything observable about a member's sequences and blocks (not its counters):
    tables, tokens, salts, block states, and the bytes of every block in use or cached."""
    m = cache.manager
    registered = sorted(b for b in range(m.num_blocks) if m._prefix.hashes[b])
    held = sorted({b for s in cache.seq_ids() for b in cache.block_table(s)} | set(registered))
    return {
        "seqs": {
            s: (cache.block_table(s), cache.token_ids(s), cache.salt(s)) for s in cache.seq_ids()
        },
        "free": m.num_free_blocks,
        "used": m.num_used_blocks,
        "cached": cache.stats().cached_blocks,
        "eviction_order": sorted(m.eviction_order()),
        "registered": registered,
        "held": held,
        "kv": cache.read_blocks(held).clone(),  # bytes of free blocks are no state
    }


def group_state(group: KVCacheGroup) -> dict:
    return {
        "where": {s: group.device_of(s) for s in group.seq_ids()},
        "pinned": group.pinned(),
        "members": {n: member_state(c) for n, c in group.members().items()},
    }


def _without(state: dict, lost: set[int]) -> dict:
    """A member's state as it would read had the cached blocks ``lost`` been evicted."""
    keep = [i for i, b in enumerate(state["held"]) if b not in lost]
    return dict(
        state,
        cached=state["cached"] - len(lost),
        eviction_order=[b for b in state["eviction_order"] if b not in lost],
        registered=[b for b in state["registered"] if b not in lost],
        held=[state["held"][i] for i in keep],
        kv=state["kv"][keep],
    )


def assert_same_state(before: dict, after: dict, *, evictions: bool = False) -> None:
    """Nothing observable changed. With ``evictions``, a member may have lost cached
    (unreferenced) blocks to an allocation that made room for a move that then failed;
    everything else, the bytes of every block still cached included, must be as it was."""
    assert before["where"] == after["where"]
    assert before["pinned"] == after["pinned"]
    for name, b in before["members"].items():
        a = after["members"][name]
        if evictions:
            assert set(a["registered"]) <= set(b["registered"]), f"member {name}: new cache"
            b = _without(b, set(b["registered"]) - set(a["registered"]))
        for key in b:
            if key == "kv":
                assert torch.equal(b[key], a[key]), f"member {name}: pool bytes changed"
            else:
                assert b[key] == a[key], f"member {name}: {key} changed: {b[key]} -> {a[key]}"
